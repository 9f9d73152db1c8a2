//! The gateway's modules import each other without circles, and ARCHITECTURE.md names
//! every one of them. The import graph is read from the source: every `use crate::…`
//! (braces expanded) and every `crate::…`/`super::…` path outside test modules, each
//! resolved to the longest module path it names. A test, not a script, so
//! `scripts/test.sh` runs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn gateway_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/src")
}

/// Every module of the gateway's library (`a::b` for `a/b.rs` or `a/b/mod.rs`) with its
/// source, test modules and comments cut.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(root).unwrap().with_extension("");
            let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let code: String = code.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
            out.insert(parts.join("::"), code);
        }
    }
    let mut out = BTreeMap::new();
    let root = gateway_src();
    walk(&root, &root, &mut out);
    out
}

/// The paths a `use` tree names, braces expanded: `a::{b, c::{d, e}}` gives `a::b`,
/// `a::c::d` and `a::c::e`.
fn expand(prefix: &[String], tree: &str) -> Vec<Vec<String>> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let mut path = prefix.to_vec();
        path.extend(tree.split("::").map(|s| s.trim().split(" as ").next().unwrap_or_default().to_owned()).filter(|s| !s.is_empty()));
        return vec![path];
    };
    let mut head = prefix.to_vec();
    head.extend(tree[..open].split("::").map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()));
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut items, mut depth, mut current) = (Vec::new(), 0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current);
    items.iter().filter(|i| !i.trim().is_empty()).flat_map(|item| expand(&head, item)).collect()
}

/// The longest module that a path names (`inference::relay::Relay` → `inference::relay`).
fn resolve(path: &[String], known: &BTreeSet<String>) -> Option<String> {
    (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| known.contains(m))
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (name, code) in &modules {
        let parent: Vec<String> = name.split("::").map(str::to_owned).collect::<Vec<_>>()[..name.split("::").count() - 1].to_vec();
        let base = |root: &str| if root == "crate" { Vec::new() } else { parent.clone() };
        let mut targets = BTreeSet::new();
        let mut rest = String::new();
        for statement in code.split(';') {
            let trimmed = statement.trim_start();
            let body = trimmed.strip_prefix("pub ").or_else(|| trimmed.strip_prefix("pub(crate) ")).unwrap_or(trimmed);
            if let Some(tree) = body.strip_prefix("use ") {
                for root in ["crate", "super"] {
                    if let Some(tree) = tree.trim().strip_prefix(&format!("{root}::")) {
                        targets.extend(expand(&base(root), tree).iter().filter_map(|p| resolve(p, &known)));
                    }
                }
            } else {
                rest.push_str(statement);
                rest.push(';');
            }
        }
        for root in ["crate", "super"] {
            let needle = format!("{root}::");
            for (at, _) in rest.match_indices(&needle) {
                if rest[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let path: String = rest[at + needle.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
                let mut full = base(root);
                full.extend(path.split("::").filter(|s| !s.is_empty()).map(str::to_owned));
                targets.extend(resolve(&full, &known));
            }
        }
        targets.remove(name);
        graph.insert(name.clone(), targets);
    }
    graph
}

/// Every circle, as the modules of each strongly connected component with more than one.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Two modules are in one circle when each reaches the other.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = graph.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for m in graph.keys() {
        if done.contains(m) || !reaches[m].contains(m) {
            continue;
        }
        let group: Vec<String> = reaches[m].iter().filter(|o| reaches.get(o).is_some_and(|r| r.contains(m))).cloned().collect();
        done.extend(group.iter().cloned());
        out.push(group);
    }
    out
}

#[test]
fn the_gateways_modules_import_each_other_without_circles() {
    let graph = graph();
    assert!(graph.len() > 40, "the gateway's modules were not found: {:?}", graph.keys());
    // The parser sees what it must: the router imports handlers, handlers import the
    // edge's error type, and the relay imports routing.
    assert!(graph["edge"].contains("api::openai"), "{:?}", graph["edge"]);
    assert!(graph["api::openai"].contains("edge::error"), "{:?}", graph["api::openai"]);
    assert!(graph["inference::relay"].contains("inference::routing"), "{:?}", graph["inference::relay"]);
    let found = circles(&graph);
    let described: Vec<String> = found
        .iter()
        .map(|group| {
            let edges: Vec<String> = group
                .iter()
                .flat_map(|m| graph[m].iter().filter(|t| group.contains(t)).map(move |t| format!("{m} -> {t}")))
                .collect();
            edges.join(", ")
        })
        .collect();
    assert!(found.is_empty(), "import circles between the gateway's modules: {described:#?}");
}

#[test]
fn the_circle_check_finds_a_circle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    graph.insert("d".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(circles(&graph), vec![vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]]);
    let known = BTreeSet::from(["x".to_owned(), "x::y".to_owned()]);
    let paths = expand(&[], "x::{y::{Z, W}, V as U}");
    assert_eq!(paths.iter().filter_map(|p| resolve(p, &known)).collect::<Vec<_>>(), ["x::y", "x::y", "x"]);
}

#[test]
fn architecture_names_a_file_for_every_module() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md")).unwrap();
    let missing: Vec<String> = modules()
        .keys()
        .map(|m| {
            let file = format!("gateway/src/{}", m.replace("::", "/"));
            let dir = gateway_src().join(m.replace("::", "/"));
            if dir.is_dir() { format!("{file}/mod.rs") } else { format!("{file}.rs") }
        })
        .filter(|file| !text.contains(&format!("`{file}`")))
        .collect();
    assert!(missing.is_empty(), "ARCHITECTURE.md does not name these files (as `path`): {missing:#?}");
}
