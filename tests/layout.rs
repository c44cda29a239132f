//! The code's layering, checked: within each crate, no two top-level modules depend on each
//! other, directly or around a loop. A request's path then reads one way through the code (taps,
//! tee, uplink in the agent; listeners, dispatch, replay in the gateway), and a new dependency
//! that would tie a lower layer to a higher one fails here, naming the loop.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const CRATES: [&str; 5] = ["wire", "runtime", "archive", "agent", "gateway"];

/// Top-level module -> the crate's other top-level modules its code (not its comments, not its
/// unit tests) names as `crate::<module>` or in a `crate::{...}` group on one line.
/// (`super::` from a top-level module names the crate root, never a sibling.)
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).expect("under src");
        let first = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("utf-8 path");
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = fs::read_to_string(&file).expect("read source");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let deps = graph.entry(module.clone()).or_default();
        for line in code.lines() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for (at, _) in line.match_indices("crate::") {
                for name in named_modules(&line[at + "crate::".len()..]) {
                    if name != module {
                        deps.insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// The top-level modules named right after a `crate::`: one (`crate::tee::Tee`), or each of a
/// group's (`crate::{tee, uplink::Queued}`, on one line).
fn named_modules(after: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect()
    };
    let Some(group) = after.strip_prefix('{') else {
        return vec![ident(after)]
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect();
    };
    // Names at the group's top level: after the brace and after each comma at depth 0.
    let mut names = vec![ident(group)];
    let mut depth = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => names.push(ident(&group[i + 1..])),
            _ => {}
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// A loop in `graph`, as the modules around it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn no_crate_has_a_module_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for krate in CRATES {
        let graph = module_graph(&root.join(krate).join("src"));
        assert!(graph.len() > 3, "{krate}: modules not found");
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "{krate}: modules depend on each other: {}",
                cycle.join(" -> ")
            );
        }
    }
}

#[test]
fn grouped_imports_name_each_module() {
    assert_eq!(named_modules("tee::Tee;"), ["tee"]);
    assert_eq!(
        named_modules("{tee, uplink::{Queued, Uplink}, self, front::Front};"),
        ["tee", "uplink", "front"]
    );
    assert_eq!(named_modules("Routing;"), Vec::<String>::new());
}

#[test]
fn a_cycle_is_found_and_named() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("ingress", &["front"][..]),
        ("front", &["proxy"]),
        ("proxy", &["ingress", "tee"]),
        ("tee", &[]),
    ]
    .into_iter()
    .map(|(m, deps)| (m.to_owned(), deps.iter().map(|d| d.to_string()).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec![
            "front".to_owned(),
            "proxy".to_owned(),
            "ingress".to_owned(),
            "front".to_owned()
        ])
    );
    let mut acyclic = graph.clone();
    acyclic.insert("proxy".into(), ["tee".to_owned()].into());
    assert_eq!(find_cycle(&acyclic), None);
}
