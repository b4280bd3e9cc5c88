//! The crate's layering, checked as a test so it cannot go stale: the datapaths never use the HTTP
//! endpoints or the commands, nothing below a command uses one, and the top-level modules import
//! each other without a cycle. `lib.rs` describes the layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its non-test code names as `crate::X`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let top = relative.split('/').next().unwrap().trim_end_matches(".rs");
            if matches!(top, "lib" | "main") || !relative.ends_with(".rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may reach anywhere; only the product's code is layered.
            let code = text.split("#[cfg(test)]").next().unwrap();
            let uses = graph.entry(top.to_string()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    uses.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn datapaths_and_lower_layers_never_use_http_or_the_commands() {
    let graph = module_graph();
    let lower = [
        "wire",
        "spec",
        "core",
        "stats",
        "sys",
        "privilege",
        "durable",
        "history",
        "fleet",
        "net",
        "iface",
        "kernel",
        "xdp",
        "afxdp",
        "tcp_lite",
    ];
    for module in lower {
        let uses = graph
            .get(module)
            .unwrap_or_else(|| panic!("no module {module}"));
        for upper in ["http", "hw", "serve", "bench", "fuzzing"] {
            assert!(
                !uses.contains(upper),
                "{module} uses crate::{upper}: {uses:?}"
            );
        }
    }
    for command in ["serve", "bench"] {
        for (module, uses) in &graph {
            if module != "fuzzing" {
                assert!(!uses.contains(command), "{module} uses crate::{command}");
            }
        }
    }
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let graph = module_graph();
    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit<'a>(
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        module: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(start) = path.iter().position(|m| *m == module) {
            panic!("import cycle: {} -> {module}", path[start..].join(" -> "));
        }
        if !done.insert(module) {
            return;
        }
        path.push(module);
        for next in graph.get(module).into_iter().flatten() {
            visit(graph, next, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(&graph, module, &mut Vec::new(), &mut done);
    }
    assert!(
        done.contains("serve") && done.contains("kernel"),
        "{graph:?}"
    );
}
