//! The source layout itself: no file imports another that imports it back (directly or round a
//! longer loop), in any crate. A module's parents (the crate root, a `mod.rs`) are its
//! namespace, not its peers, so a child naming an item of its parent is not counted; tests
//! (`*tests.rs` files, `#[cfg(test)]` modules) are not either. No server: the tree is the project's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each crate's module tree (the end-to-end suite's too).
const TREES: [&str; 6] = [
    "bus/src",
    "agents/src",
    "dispatcher/src",
    "daemon/src",
    "policyctl/src",
    "tests/tests/e2e",
];

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `src`: `kinds/conn_limit.rs` is `[kinds, conn_limit]`,
/// `kinds/mod.rs` is `[kinds]`, the crate root `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string()
        })
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The module paths a file names, through `crate::` and `super::` (each path of a `{...}`
/// group too), resolved against the file's own module path.
fn named(text: &str, module: &[String]) -> Vec<Vec<String>> {
    // Comments name modules too: a line's text from a `//` that starts it or follows a space.
    // A file's tests (its `#[cfg(test)]` module, at its end) are not what it is built from.
    let code: String = text
        .lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .map(|l| match l.find("//") {
            Some(i) if i == 0 || l[..i].ends_with(' ') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    // `super` of `a/b.rs` and of `a/b/mod.rs` (both module a::b) is `a`.
    let parent = module[..module.len().saturating_sub(1)].to_vec();
    for (start, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut rest = code.as_str();
        while let Some(i) = rest.find(start) {
            let before = rest[..i].chars().last();
            rest = &rest[i + start.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            paths(rest, &base, &mut out);
        }
    }
    out
}

/// The paths at the start of `text` (`a::b`, or each of `{a::b, c}`), after `base`.
fn paths(text: &str, base: &[String], out: &mut Vec<Vec<String>>) {
    if let Some(group) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut item_start = true;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => return,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if c.is_whitespace() => {}
                _ if item_start => {
                    item_start = false;
                    paths(&group[i..], base, out);
                }
                _ => {}
            }
        }
        return;
    }
    let path: String = text
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect();
    let mut full = base.to_vec();
    full.extend(path.split("::").filter(|s| !s.is_empty()).map(String::from));
    if text[path.len()..].starts_with('{') && path.ends_with("::") {
        paths(&text[path.len()..], &full, out);
    } else {
        out.push(full);
    }
}

/// What the crate root re-exports (`pub use decision::{Action, Effect};`): name -> the path
/// it stands for, so that `crate::Action` counts as naming `decision`.
fn reexports(src: &Path) -> BTreeMap<String, Vec<String>> {
    let root = ["lib.rs", "main.rs"]
        .iter()
        .find_map(|f| std::fs::read_to_string(src.join(f)).ok())
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut rest = root.as_str();
    while let Some(i) = rest.find("pub use ") {
        rest = &rest[i + "pub use ".len()..];
        let mut found = Vec::new();
        paths(rest, &[], &mut found);
        for path in found {
            if let Some(name) = path.last() {
                out.insert(name.clone(), path.clone());
            }
        }
    }
    out
}

/// The import graph of one crate: file module path -> module paths of the files it names.
fn graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut all = Vec::new();
    files(src, &mut all);
    all.retain(|f| !f.to_string_lossy().ends_with("tests.rs"));
    let modules: BTreeSet<Vec<String>> = all.iter().map(|f| module_of(src, f)).collect();
    let reexported = reexports(src);
    let mut edges = BTreeMap::new();
    for file in &all {
        let module = module_of(src, file);
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let mut to = BTreeSet::new();
        for mut path in named(&text, &module) {
            if let Some(full) = path.first().and_then(|n| reexported.get(n)) {
                path = full.clone();
            }
            // The longest prefix that is a file's module.
            let target = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains(p));
            let Some(target) = target else { continue };
            // Not itself, and not one of its parents (its namespace).
            if target == module || module.starts_with(&target) {
                continue;
            }
            to.insert(target);
        }
        edges.insert(module, to);
    }
    edges
}

/// A loop in the graph, as the files along it, if there is one.
fn a_loop(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<String>> {
    fn visit(
        node: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut found: Vec<String> = stack[i..].iter().map(|m| m.join("::")).collect();
            found.push(node.join("::"));
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, stack, done) {
                return Some(found);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_file_imports_another_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for tree in TREES {
        let edges = graph(&root.join(tree));
        assert!(edges.len() > 2, "{tree}: no files found");
        if let Some(found) = a_loop(&edges) {
            panic!("{tree}: a file cycle: {}", found.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let module = |m: &str| m.split("::").map(String::from).collect::<Vec<_>>();
    // Both sides of one: `a` names `b` through `super`, `b` names `a` through `crate`.
    let a = named("use super::b::{X, y::Z};", &module("k::a"));
    assert_eq!(a, [module("k::b::X"), module("k::b::y::Z")]);
    let b = named(
        "fn f() { crate::k::a::run() } // crate::k::c",
        &module("k::b"),
    );
    assert_eq!(b, [module("k::a::run")]);
    let mut edges = BTreeMap::new();
    edges.insert(module("k::a"), BTreeSet::from([module("k::b")]));
    edges.insert(module("k::b"), BTreeSet::from([module("k::a")]));
    assert!(a_loop(&edges).is_some());
    edges.insert(module("k::b"), BTreeSet::new());
    assert!(a_loop(&edges).is_none());
}
