//! What `deploy/` ships is checked, not trusted:
//!
//! - every Kubernetes manifest validates against the Kubernetes schemas (`kubernetes-validate`
//!   from PyPI, which carries them: works offline); custom resources (cert-manager, Prometheus
//!   operator) have no schema there and must be of a known kind; every file a kustomization
//!   names exists and every manifest belongs to a kustomization;
//! - every teeway configuration shipped in a ConfigMap passes `teeway check`, with certificates
//!   where the pod mounts them;
//! - every metric the Grafana dashboard and the alert rules query is one the running binaries
//!   export, and both binaries' `/metrics` pass `promtool check metrics`;
//! - the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`),
//!   one case where each alert fires and one where it stays quiet.
//!
//! Without `kubernetes-validate` on PATH the schema test says so and skips, unless
//! `TEEWAY_REQUIRE_TOOLS` is set (CI sets it after installing the tool): then it fails.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use teeway_runtime::yaml::{self, Value};

use support::{admin_get, Stack};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The oldest Kubernetes minor the manifests are written for.
const KUBERNETES_VERSION: &str = "1.30.0";
/// Custom resources the manifests use; the Kubernetes schemas do not describe them.
const CUSTOM_KINDS: [(&str, &str); 7] = [
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "ServiceEntry"),
];

fn k8s_dir() -> PathBuf {
    Path::new(ROOT).join("deploy/k8s")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
}

fn load(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read");
    yaml::parse_all(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_sequence)
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What the kustomizations under deploy/k8s say: the manifests they list and the teeway
/// configuration files their ConfigMap generators embed.
#[derive(Default)]
struct Layout {
    kustomizations: Vec<PathBuf>,
    manifests: BTreeSet<PathBuf>,
    configs: BTreeSet<PathBuf>,
}

fn layout() -> Layout {
    let mut files = Vec::new();
    yaml_files(&k8s_dir(), &mut files);
    let mut layout = Layout::default();
    for file in files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "kustomization.yaml"))
    {
        let dir = file.parent().expect("parent");
        let doc = load(file).remove(0);
        for resource in strings(doc.get("resources")) {
            let path = dir.join(&resource);
            assert!(
                path.exists(),
                "{} names {resource}, which does not exist",
                file.display()
            );
            if path.is_file() {
                layout.manifests.insert(path.canonicalize().expect("path"));
            }
        }
        for generator in doc
            .get("configMapGenerator")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            for name in strings(generator.get("files")) {
                let path = dir.join(&name);
                assert!(path.is_file(), "{} embeds {name}: missing", file.display());
                layout.configs.insert(path.canonicalize().expect("path"));
            }
        }
        layout.kustomizations.push(file.clone());
    }
    for file in &files {
        let file = file.canonicalize().expect("path");
        let known = layout.manifests.contains(&file)
            || layout.configs.contains(&file)
            || file.ends_with("kustomization.yaml");
        assert!(
            known,
            "{} is in no kustomization: apply would skip it",
            file.display()
        );
    }
    layout
}

fn tool_missing(tool: &str, why: &str) {
    support::tool_missing(tool, why, "`pip install kubernetes-validate`");
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let layout = layout();
    assert!(!layout.kustomizations.is_empty(), "no kustomization found");
    assert!(!layout.manifests.is_empty(), "no manifest found");

    // Custom resources: known kinds, named, with a spec.
    let mut custom = 0;
    for file in &layout.manifests {
        for doc in load(file) {
            let api = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
            assert!(
                !api.is_empty() && !kind.is_empty(),
                "{}: a document without apiVersion/kind",
                file.display()
            );
            let name = doc.get("metadata").and_then(|m| m.get("name"));
            assert!(name.is_some(), "{}: {kind} has no name", file.display());
            if api.contains(".io/") && !api.contains("k8s.io/") {
                assert!(
                    CUSTOM_KINDS.contains(&(api, kind)),
                    "{}: unexpected custom resource {api} {kind}",
                    file.display()
                );
                assert!(
                    doc.get("spec").is_some(),
                    "{}: {kind} has no spec",
                    file.display()
                );
                custom += 1;
            }
        }
    }
    assert!(
        custom > 0,
        "the cert-manager and monitoring resources are checked"
    );

    let output = match Command::new("kubernetes-validate")
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(&layout.manifests)
        .output()
    {
        Ok(output) => output,
        Err(e) => return tool_missing("kubernetes-validate", &e.to_string()),
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let passed = report.matches(" passed for resource ").count();
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.starts_with("INFO"))
        .filter(|l| {
            // Custom resources were checked above.
            !(l.starts_with("WARN")
                && l.contains("Couldn't find schema for kind")
                && CUSTOM_KINDS
                    .iter()
                    .any(|(api, kind)| l.contains(&format!("kind {kind} with api version {api}"))))
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        output.status.success() && problems.is_empty(),
        "manifests do not validate:\n{report}"
    );
    assert!(passed > 0, "nothing was validated:\n{report}");
    println!(
        "validated {passed} resources in {} files against Kubernetes {KUBERNETES_VERSION}",
        layout.manifests.len()
    );
}

#[test]
fn every_shipped_teeway_config_passes_check() {
    let layout = layout();
    assert!(!layout.configs.is_empty(), "no teeway config in deploy/k8s");
    // The pods run in /etc/teeway with the config under config/ and cert-manager's Secret under
    // tls/: recreate that, with certificates made now.
    let tmp = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_teeway"))
        .args(["certs", "init", "--dir", "made"])
        .current_dir(tmp.path())
        .output()
        .expect("certs");
    assert!(out.status.success(), "{out:?}");
    for config in &layout.configs {
        let text = std::fs::read_to_string(config).expect("read");
        let doc = yaml::parse(&text).expect("yaml");
        // An agent has a primary, or takes a mirror feed (sink); both have a cluster.
        let role = if doc.get("cluster").is_some() {
            "agent"
        } else {
            "gateway"
        };
        let pod = tmp.path().join(format!("pod-{role}"));
        std::fs::create_dir_all(pod.join("config")).expect("mkdir");
        std::fs::create_dir_all(pod.join("tls")).expect("mkdir");
        let made = tmp.path().join("made");
        for (from, to) in [
            ("ca.pem".to_owned(), "ca.crt"),
            (format!("{role}.pem"), "tls.crt"),
            (format!("{role}.key"), "tls.key"),
        ] {
            std::fs::copy(made.join(from), pod.join("tls").join(to)).expect("copy");
        }
        let name = config.file_name().expect("name");
        std::fs::write(pod.join("config").join(name), &text).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_teeway"))
            .arg("check")
            .arg(Path::new("config").join(name))
            .current_dir(&pod)
            .output()
            .expect("check");
        assert!(
            out.status.success(),
            "{} fails teeway check:\n{}",
            config.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Metric names in a PromQL expression: identifiers starting `teeway_`.
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("teeway_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            out.insert(expr[start..end].to_owned());
        }
        i = end;
    }
}

fn json_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => json_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| json_exprs(v, out)),
        _ => {}
    }
}

/// Series names in Prometheus text (`name{...} value` or `name value`).
fn exported(text: &str, out: &mut BTreeSet<String>) {
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        out.insert(line[..end].to_owned());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_only_metrics_the_binaries_export() {
    // Queried: the dashboard's expressions and every alert rule's.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/teeway.json"))
            .expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    json_exprs(&dashboard, &mut exprs);
    let mut rules = 0;
    for file in &layout().manifests {
        for doc in load(file) {
            if doc.get("kind").and_then(Value::as_str) != Some("PrometheusRule") {
                continue;
            }
            let groups = doc.get("spec").and_then(|s| s.get("groups"));
            for group in groups.and_then(Value::as_sequence).into_iter().flatten() {
                for rule in group
                    .get("rules")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                {
                    let expr = rule.get("expr").and_then(Value::as_str).expect("expr");
                    exprs.push(expr.to_owned());
                    rules += 1;
                }
            }
        }
    }
    assert!(rules > 0, "no alert rule found");
    let mut queried = BTreeSet::new();
    for e in &exprs {
        metric_names(e, &mut queried);
    }
    assert!(queried.len() > 10, "too few metrics found: {queried:?}");

    // Exported: a running agent (with a TCP listener and a spool) and gateway (with an archive)
    // after real traffic: the families those parts register exist only with them.
    let tmp = tempfile::tempdir().expect("tmp");
    let tcp_primary = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let tcp_primary_addr = tcp_primary.local_addr().expect("addr");
    let stack = Stack::start_configured(
        100.0,
        |gateway| {
            gateway.archive = Some(teeway_archive::ArchiveConfig::new(
                tmp.path().join("archive"),
                teeway_archive::Format::Teeway,
            ));
        },
        |agent| {
            agent.tcp = vec![teeway_agent::config::TcpListenerConfig {
                name: "redis".into(),
                listen: "127.0.0.1:0".parse().expect("addr"),
                primary: ("127.0.0.1".into(), tcp_primary_addr.port()),
                percentage: 100.0,
                max_teed_connections: 4,
                buffer_bytes: 64 * 1024,
            }];
            if let Some(g) = agent.gateway.as_mut() {
                g.spool = Some(teeway_agent::SpoolConfig {
                    dir: tmp.path().join("spool"),
                    max_bytes: 16 << 20,
                });
            }
        },
    )
    .await;
    for i in 0..5 {
        let (status, _) = admin_get(stack.agent.addr, &format!("/d/{i}")).await;
        assert_eq!(status, 200);
    }
    assert_eq!(stack.recording.wait_for(5, support::LIMIT).await, 5);
    let gateway_admin = stack.gateway.as_ref().and_then(|g| g.admin);
    let mut names = BTreeSet::new();
    for admin in [stack.agent.admin, gateway_admin] {
        let admin = admin.expect("admin listener");
        let (status, body) = admin_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        exported(&body, &mut names);
        promtool_check_metrics(&body);
        // Families come in one order, scrape after scrape (the exporter's own order varies).
        let families = |text: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .map(str::to_owned)
                .collect()
        };
        let (_, again) = admin_get(admin, "/metrics").await;
        assert_eq!(families(&body), families(&again));
        let mut sorted = families(&body);
        sorted.sort();
        let teeway_only = |f: &Vec<String>| -> Vec<String> {
            f.iter()
                .filter(|n| n.starts_with("teeway_"))
                .cloned()
                .collect()
        };
        assert_eq!(teeway_only(&families(&body)), teeway_only(&sorted));
    }
    let missing: Vec<_> = queried.difference(&names).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {names:?}"
    );
    println!("{} metrics queried, all exported", queried.len());
    stack.stop().await;
}

/// `promtool check metrics` on a live `/metrics` output: naming, help, types, histogram series.
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return support::tool_missing(
                "promtool",
                &e.to_string(),
                "`apt-get install prometheus`",
            )
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shipped alert rules parse, pass promtool's lint, and every alert has a unit test where
/// it fires and one where it stays quiet (deploy/prometheus-tests/).
#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    if Command::new("promtool").arg("--version").output().is_err() {
        return support::tool_missing("promtool", "not on PATH", "`apt-get install prometheus`");
    }
    let out = Command::new("bash")
        .arg(Path::new(ROOT).join("deploy/prometheus-tests/run-promtool.sh"))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The feed examples point at the sink the sink example runs: same port, same host, and the
/// Istio resources are kinds the mesh knows, with a spec. (Neither Istio nor Envoy can be
/// installed here; tests/sink.rs speaks their feed to a real sink, and runs the nginx one.)
#[test]
fn feed_examples_point_at_the_sink() {
    let examples = Path::new(ROOT).join("deploy/examples");
    let sink =
        yaml::parse(&std::fs::read_to_string(examples.join("agent-sink.yaml")).expect("read"))
            .expect("yaml");
    let listen = sink.get("listen").and_then(Value::as_str).expect("listen");
    assert!(sink.get("sink").is_some(), "agent-sink.yaml is a sink");
    let port: u64 = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");

    let istio = load(&examples.join("feeds/istio-mirror.yaml"));
    assert_eq!(istio.len(), 2, "a ServiceEntry and a VirtualService");
    for doc in &istio {
        let api = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        assert!(CUSTOM_KINDS.contains(&(api, kind)), "{api} {kind}");
        assert!(doc.get("spec").is_some(), "{kind} has a spec");
    }
    let entry = &istio[0]["spec"];
    let mirror = &istio[1]["spec"]["http"][0]["mirror"];
    assert_eq!(
        mirror["host"], entry["hosts"][0],
        "the mirror goes to the ServiceEntry's host"
    );
    assert_eq!(mirror["port"]["number"].as_u64(), Some(port));
    assert_eq!(entry["ports"][0]["number"].as_u64(), Some(port));

    let envoy = load(&examples.join("feeds/envoy-mirror.yaml"));
    let clusters = envoy[0]["static_resources"]["clusters"]
        .as_sequence()
        .expect("clusters");
    let sink_cluster = clusters
        .iter()
        .find(|c| c["name"] == "teeway_sink")
        .expect("the teeway_sink cluster");
    let address = &sink_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ["address"]["socket_address"];
    assert_eq!(address["port_value"].as_u64(), Some(port));
    let route = &envoy[0]["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"];
    assert_eq!(
        route["request_mirror_policies"][0]["cluster"],
        "teeway_sink"
    );
}
