//! Comparing versions end to end (`routes[].compare`), with the real binary: production traffic
//! through an agent, copies replayed by the gateway to a candidate (v2), a primary (v1) and a
//! secondary (another v1) of a small JSON service (tests/interop/compare/service.py) whose every
//! answer carries a random id and the time, and whose v2 prices half the users wrong.
//!
//! `teeway diff` finds the same offline, from the gateway's archive of every target's answer
//! (`--from-archive`) and by replaying an agent's archive with production's answers in it; its
//! static report shows the same in the browser.
//!
//! The gateway's `/compare` reports the regression on the right endpoint and field, the id and
//! time as noise, an unchanged endpoint with no differing copy, and every copy counted once; and
//! its page, `/compare/ui`, shows the same to a real browser (Debian's Chromium, driven by
//! Playwright: tests/interop/compare/ui.mjs) from endpoint to field to sample.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use teeway_runtime::metrics::Snapshot;

use support::redis::Reap;
use support::{admin_get, certs_init, field, get, scrape, settle_async, KeepAlive, Proc};

/// The service in `version`, on a free port; `None` (said) without python3.
fn service(version: &str) -> Option<(Reap, SocketAddr)> {
    let Some(python) = support::find_program("python3") else {
        support::tool_missing(
            "python3",
            "the JSON service compared",
            "apt-get install python3",
        );
        return None;
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/compare/service.py");
    let mut child = Command::new(python)
        .arg(script)
        .args(["--version", version])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("service.py runs");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("its port");
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("service.py said {line:?}"));
    Some((Reap(child), SocketAddr::from(([127, 0, 0, 1], port))))
}

/// A gateway and an agent in front of `production`, started in `dir` with certificates made
/// there, the uplink connected.
struct Stack {
    gateway: Proc,
    gateway_admin: SocketAddr,
    agent: Proc,
    agent_addr: SocketAddr,
    agent_admin: SocketAddr,
}

impl Stack {
    /// `gateway_more` is the gateway's configuration past `listen`, `tls` and `admin`;
    /// `agent_more`, the agent's past its front, gateway and admin.
    fn start(
        dir: &std::path::Path,
        gateway_more: &str,
        production: SocketAddr,
        agent_more: &str,
    ) -> Self {
        certs_init(dir);
        std::fs::write(
            dir.join("gateway.yaml"),
            format!(
                "listen: 127.0.0.1:0
tls: {{ ca: certs/dev/ca.pem, cert: certs/dev/gateway.pem, key: certs/dev/gateway.key }}
admin: {{ listen: 127.0.0.1:0 }}
{gateway_more}"
            ),
        )
        .expect("write");
        let gateway = Proc::spawn(dir, &["gateway", "--config", "gateway.yaml"]);
        let serving = gateway.wait_for_line("gateway serving");
        let gateway_addr = field(&serving, "listen");
        let gateway_admin: SocketAddr = field(&serving, "admin").parse().expect("admin");
        std::fs::write(
            dir.join("agent.yaml"),
            format!(
                "cluster: prod-eu-1\nlisten: 127.0.0.1:0\nprimary: http://{production}\ngateway:\n  address: {gateway_addr}\n  server_name: localhost\n  ca: certs/dev/ca.pem\n  cert: certs/dev/agent.pem\n  key: certs/dev/agent.key\nadmin: {{ listen: 127.0.0.1:0 }}\n{agent_more}"
            ),
        )
        .expect("write");
        let agent = Proc::spawn(dir, &["agent", "--config", "agent.yaml"]);
        let line = agent.wait_for_line("agent serving");
        let agent_addr: SocketAddr = field(&line, "listen").parse().expect("listen");
        let agent_admin: SocketAddr = field(&line, "admin").parse().expect("admin");
        agent.wait_for_line("uplink connected");
        Self {
            gateway,
            gateway_admin,
            agent,
            agent_addr,
            agent_admin,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regression_is_found_on_its_endpoint_and_field_and_noise_is_told_apart() {
    let Some((_v1, v1)) = service("v1") else {
        return;
    };
    let (_v1b, v1b) = service("v1").expect("v1b");
    let (_v2, v2) = service("v2").expect("v2");
    let (_prod, prod) = service("v1").expect("production");
    let dir = tempfile::tempdir().expect("tempdir");
    let Stack {
        gateway,
        gateway_admin,
        agent: _agent,
        agent_addr,
        ..
    } = Stack::start(
        dir.path(),
        &format!(
            "routes:
  - name: users
    targets: [http://{v2}, http://{v1}, http://{v1b}]
    compare:
      candidate: http://{v2}
      primary: http://{v1}
      secondary: http://{v1b}
archive: {{ dir: archive, record_responses: true, max_response_body: 1MiB }}
"
        ),
        prod,
        "",
    );

    let mut client = KeepAlive::open(agent_addr).await;
    for i in 0..60 {
        for path in [format!("/users/{i}"), "/health".to_owned()] {
            let (status, _) = client.exchange(get(&path)).await.expect("answered");
            assert_eq!(status, http::StatusCode::OK, "{path}");
        }
    }
    let copies = "teeway_gateway_compare_copies_total";
    let s = settle_async(
        || scrape(gateway_admin),
        |s: &Snapshot| s.sum(copies) >= 120.0 && s.sum("teeway_gateway_compare_in_flight") == 0.0,
    )
    .await;
    let result = |r: &str| s.sum_where(copies, &[("result", r)]);
    assert_eq!(
        s.sum(copies),
        120.0,
        "every copy counted once: {}",
        gateway.unread_lines()
    );
    assert_eq!(result("skipped"), 0.0);
    assert_eq!(
        result("differing"),
        30.0,
        "the even users, each counted as a regression"
    );

    let (status, body) = admin_get(gateway_admin, "/compare").await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let endpoints = report["routes"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .clone();
    let endpoint = |name: &str| {
        endpoints
            .iter()
            .find(|e| e["endpoint"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {body}"))
    };
    assert_eq!(
        endpoints[0]["endpoint"], "GET /users/{id}",
        "most differing first"
    );
    let users = endpoint("GET /users/{id}");
    assert_eq!(users["compared"], 60);
    assert_eq!(users["differing"], 30);
    let verdict = |e: &serde_json::Value, f: &str| {
        e["fields"]
            .as_array()
            .and_then(|fields| fields.iter().find(|x| x["field"] == f))
            .map(|x| x["verdict"].clone())
            .unwrap_or_else(|| panic!("{f} in {e}"))
    };
    assert_eq!(verdict(&users, "/price"), "differing");
    assert_eq!(verdict(&users, "/request_id"), "noise");
    assert_eq!(verdict(&users, "/at"), "noise");
    let health = endpoint("GET /health");
    assert_eq!(health["compared"], 60);
    assert_eq!(health["differing"], 0, "unchanged: {health}");
    assert_eq!(verdict(&health, "/request_id"), "noise");

    let (status, body) = admin_get(
        gateway_admin,
        "/compare/samples?route=users&endpoint=GET+%2Fusers%2F%7Bid%7D&field=%2Fprice",
    )
    .await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    let samples: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let samples = samples["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 3, "the default samples per field");
    for sample in samples {
        let uri = sample["request"]["uri"].as_str().unwrap_or_default();
        let user: u32 = uri.trim_start_matches("/users/").parse().expect("a user");
        assert_eq!(user % 2, 0, "an even user: {sample}");
        assert!(sample["candidate"]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("\"price\": 12"));
        assert!(sample["primary"]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("\"price\": 10"));
    }

    // Offline, from what the gateway archived (each target's answer, `record_responses`):
    // `teeway diff --from-archive` finds what the gateway found, copy for copy.
    let archived = settle_async(
        || scrape(gateway_admin),
        |s: &Snapshot| s.sum("teeway_archive_records_total") >= 480.0,
    )
    .await;
    assert_eq!(
        archived.sum("teeway_archive_records_total"),
        480.0,
        "120 requests, 3 answers each"
    );
    let report = dir.path().join("report.html");
    let diff = Command::new(env!("CARGO_BIN_EXE_teeway"))
        .current_dir(dir.path())
        .args(["diff", "--from-archive"])
        .args(["--candidate", &format!("http://{v2}")])
        .args(["--primary", &format!("http://{v1}")])
        .args(["--secondary", &format!("http://{v1b}")])
        .args(["--report", "report.html", "--fail-on-differing", "archive"])
        .output()
        .expect("teeway diff runs");
    let printed = String::from_utf8_lossy(&diff.stdout);
    let complaint = String::from_utf8_lossy(&diff.stderr);
    assert_eq!(
        diff.status.code(),
        Some(1),
        "a regression fails the pipeline: {printed} {complaint}"
    );
    assert!(
        complaint.contains("1 field(s) differ more than noise explains: GET /users/{id} /price"),
        "{complaint}"
    );
    assert!(
        printed.contains("requests:  120 read, 120 compared: 30 differing"),
        "{printed}"
    );
    assert!(
        printed.contains("GET /users/{id}  60 compared, 30 differing (50.0%)"),
        "{printed}"
    );
    assert!(printed.contains("  differing  /price"), "{printed}");
    assert!(printed.contains("  noise      /request_id"), "{printed}");
    assert!(
        printed.contains("GET /health  60 compared, 0 differing (0.0%)"),
        "{printed}"
    );

    // A role the archive holds no answer of is named, not read as a 100% regression.
    let typo = Command::new(env!("CARGO_BIN_EXE_teeway"))
        .current_dir(dir.path())
        .args(["diff", "--from-archive", "--quiet"])
        .args(["--candidate", "http://127.0.0.1:1"])
        .args(["--primary", &format!("http://{v1}"), "archive"])
        .output()
        .expect("teeway diff runs");
    let complaint = String::from_utf8_lossy(&typo.stderr);
    assert_eq!(typo.status.code(), Some(1), "{complaint}");
    assert!(
        complaint.contains("--candidate http://127.0.0.1:1: the archives hold no answer of it")
            && complaint.contains(&format!("http://{v2}")),
        "{complaint}"
    );

    // The page, in a real browser: live on the admin port, then the static report.
    let Some(driver) = browser_driver() else {
        return;
    };
    let out = Command::new(&driver.0)
        .arg(&driver.1)
        .arg(format!("file://{}", report.display()))
        .arg("/price")
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "ui.mjs on the report: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from ui.mjs");
    assert_eq!(
        offline["endpoints"][0],
        serde_json::json!(["GET /users/{id}", "50.0%"]),
        "the static report shows what the gateway's page shows: {offline}"
    );
    assert_eq!(
        offline["fields"][0],
        serde_json::json!(["/price", "differing"])
    );
    assert_eq!(offline["samples"].as_array().map(Vec::len), Some(3));
    let screenshot = match std::env::var_os("TEEWAY_UPDATE_SCREENSHOT") {
        Some(_) => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/compare-ui.png"),
        None => dir.path().join("compare-ui.png"),
    };
    let out = Command::new(&driver.0)
        .arg(&driver.1)
        .arg(format!("http://{gateway_admin}"))
        .arg("/price")
        .arg(&screenshot)
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "ui.mjs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from ui.mjs");
    assert_eq!(
        shown["endpoints"][0],
        serde_json::json!(["GET /users/{id}", "50.0%"]),
        "the most differing endpoint first: {shown}"
    );
    assert_eq!(shown["endpoints"][1][0], "GET /health");
    assert_eq!(shown["endpoints"][1][1], "0.0%");
    let fields = shown["fields"].as_array().expect("fields");
    assert_eq!(
        fields[0],
        serde_json::json!(["/price", "differing"]),
        "differing fields first: {shown}"
    );
    for noise in ["/request_id", "/at"] {
        assert!(
            fields.contains(&serde_json::json!([noise, "noise"])),
            "{noise} shown as noise: {shown}"
        );
    }
    assert!(shown["roles"]
        .as_str()
        .unwrap_or_default()
        .contains(&format!("candidate http://{v2}")));
    let samples = shown["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 3);
    assert!(
        samples[0]["candidate"]
            .as_str()
            .unwrap_or_default()
            .contains("\"price\": 12"),
        "{shown}"
    );
    assert!(
        samples[0]["primary"]
            .as_str()
            .unwrap_or_default()
            .contains("\"price\": 10"),
        "{shown}"
    );
    assert!(samples[0]["differences"]
        .as_array()
        .is_some_and(|d| d.contains(&serde_json::json!("/price (value)"))));
    assert!(shown["crumbs"]
        .as_str()
        .unwrap_or_default()
        .contains("GET /users/{id}"));
    assert!(
        std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000),
        "a screenshot"
    );
    assert_eq!(shown["back"], "#/", "the crumbs lead back to every route");
}

/// `compare.primary: production`: the candidate is compared with what production itself
/// answered, which the agent (`mirror.capture_response`) sends with each copy, on its HTTP/1.1
/// fast path (GETs) and through hyper (POSTs with a body) alike. The baseline a sample shows is,
/// byte for byte, the answer the client got; production's session cookie never leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_itself_is_the_baseline() {
    let Some((_v1b, v1b)) = service("v1") else {
        return;
    };
    let (_v2, v2) = service("v2").expect("v2");
    let (_prod, prod) = service("v1").expect("production");
    let dir = tempfile::tempdir().expect("tempdir");
    let Stack {
        gateway,
        gateway_admin,
        agent: _agent,
        agent_addr,
        agent_admin,
    } = Stack::start(
        dir.path(),
        &format!(
            "routes:
  - name: users
    targets: [http://{v2}, http://{v1b}]
    compare:
      candidate: http://{v2}
      primary: production
      secondary: http://{v1b}
      headers: [content-type, set-cookie]
"
        ),
        prod,
        "mirror:\n  capture_response: { enabled: true }\narchive: { dir: capture }\n",
    );

    // What production answered each request, as the client got it.
    let mut answered = std::collections::HashMap::new();
    let mut client = KeepAlive::open(agent_addr).await;
    for i in 0..60 {
        let path = format!("/users/{i}");
        let request = if i % 3 == 0 {
            support::post(&path, bytes::Bytes::from_static(b"{\"q\":1}"))
        } else {
            get(&path)
        };
        let (status, body) = client.exchange(request).await.expect("answered");
        assert_eq!(status, http::StatusCode::OK, "{path}");
        answered.insert(path, body);
    }
    let copies = "teeway_gateway_compare_copies_total";
    let s = settle_async(
        || scrape(gateway_admin),
        |s: &Snapshot| s.sum(copies) >= 60.0 && s.sum("teeway_gateway_compare_in_flight") == 0.0,
    )
    .await;
    let result = |r: &str| s.sum_where(copies, &[("result", r)]);
    assert_eq!(s.sum(copies), 60.0, "{}", gateway.unread_lines());
    assert_eq!(result("skipped"), 0.0, "every copy carried its answer");
    assert_eq!(result("differing"), 30.0, "the even users");
    let a = scrape(agent_admin).await;
    assert_eq!(
        a.sum_where(
            "teeway_agent_production_answers_total",
            &[("result", "sent")]
        ),
        60.0
    );
    assert_eq!(a.sum("teeway_agent_production_answers_total"), 60.0);

    let (_, body) = admin_get(gateway_admin, "/compare").await;
    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let route = &report["routes"][0];
    assert_eq!(route["primary"], "production", "{body}");
    let users = &route["endpoints"][0];
    assert_eq!(users["endpoint"], "GET /users/{id}", "{body}");
    let verdict = |f: &str| {
        users["fields"]
            .as_array()
            .and_then(|fields| fields.iter().find(|x| x["field"] == f))
            .map(|x| x["verdict"].clone())
            .unwrap_or_else(|| panic!("{f} in {users}"))
    };
    assert_eq!(verdict("/price"), "differing");
    assert_eq!(
        verdict("/request_id"),
        "noise",
        "production and v1 disagree on it too"
    );
    assert_eq!(verdict("/at"), "noise");
    assert_eq!(
        verdict("header:set-cookie (extra)"),
        "noise",
        "production's cookie never left it, the shadows' reach the gateway: learned as noise"
    );

    for endpoint in ["GET+%2Fusers%2F%7Bid%7D", "POST+%2Fusers%2F%7Bid%7D"] {
        let (status, body) = admin_get(
            gateway_admin,
            &format!("/compare/samples?route=users&endpoint={endpoint}&field=%2Fprice"),
        )
        .await;
        assert_eq!(status, http::StatusCode::OK, "{body}");
        let samples: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let samples = samples["samples"].as_array().expect("samples");
        assert!(!samples.is_empty(), "{endpoint}: {body}");
        for sample in samples {
            let uri = sample["request"]["uri"].as_str().unwrap_or_default();
            let primary = sample["primary"]["body"].as_str().unwrap_or_default();
            assert_eq!(
                primary.as_bytes(),
                &answered[uri][..],
                "the baseline is the very answer the client got"
            );
            let headers = sample["primary"]["headers"].to_string();
            assert!(!headers.contains("session="), "{headers}");
        }
    }

    // Offline: the agent's own archive holds each request with production's answer; `teeway
    // diff` replays the requests to v2 and v1 and finds the same, as a user runs it (progress
    // on).
    settle_async(
        || scrape(agent_admin),
        |s: &Snapshot| s.sum("teeway_archive_records_total") >= 60.0,
    )
    .await;
    let diff = Command::new(env!("CARGO_BIN_EXE_teeway"))
        .current_dir(dir.path())
        .args(["diff", "--candidate", &format!("http://{v2}")])
        .args(["--primary", "production"])
        .args(["--secondary", &format!("http://{v1b}"), "capture"])
        .output()
        .expect("teeway diff runs");
    let printed = String::from_utf8_lossy(&diff.stdout);
    assert!(
        diff.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&diff.stderr)
    );
    assert!(
        printed.contains(&format!(
            "candidate http://{v2} vs primary production, noise from http://{v1b}"
        )),
        "{printed}"
    );
    assert!(
        printed.contains("requests:  60 read, 60 compared: 30 differing"),
        "{printed}"
    );
    assert!(printed.contains("  differing  /price"), "{printed}");
    assert!(printed.contains("  noise      /at"), "{printed}");
}

/// Node.js and the driver script, when Chromium and Playwright are installed (`.ci/run` installs
/// them: Debian's chromium, `npm ci` in tests/interop/compare).
fn browser_driver() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/compare");
    let node = support::find_program("node");
    let chromium = std::env::var_os("CHROMIUM")
        .map(std::path::PathBuf::from)
        .or_else(|| support::find_program("chromium"));
    let playwright = dir.join("node_modules/playwright-core").is_dir();
    match (node, chromium, playwright) {
        (Some(node), Some(_), true) => Some((node, dir.join("ui.mjs"))),
        _ => {
            support::tool_missing(
                "node, chromium, playwright-core",
                "the /compare/ui page in a real browser",
                "apt-get install nodejs chromium; (cd tests/interop/compare && npm ci)",
            );
            None
        }
    }
}
