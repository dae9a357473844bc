//! The library's structure, checked: every module imports only the layers below its own (so no
//! import runs in a circle between layers), no file's `crate::`/`super::` paths run in a
//! circle, no source file grows past 800 lines, and no function past 100. Read from the source
//! text, so it costs a second and needs nothing installed. Test code (`tests.rs`, `mod tests`)
//! is exempt: it may reach anywhere.
//!
//! What the file check does not see: a module's `mod` and `pub use` of its own children (a
//! parent re-exporting a child, which then names the parent's items, is allowed), and which
//! child a name re-exported by a parent really comes from (it counts as the parent's).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The library's top-level modules, bottom layer first. A module may import only modules of
/// lower layers (and itself); two modules of one layer know nothing of each other.
const LAYERS: &[&[&str]] = &[
    // Names, clocks, configuration, metric helpers, TLS files and map housekeeping every layer
    // uses.
    &[
        "ids", "timer", "backoff", "shutdown", "config", "series", "tls", "eviction",
    ],
    // Logs and traces (their settings are validated like any config); reaching PostgreSQL.
    &["telemetry", "postgres"],
    // The reliable-delivery protocol; the cluster (membership, links, singletons); the broker.
    &["delivery", "cluster", "amqp"],
    // Entities and where they keep their state.
    &["entity"],
    // Sharding (where entities run); the orders the binaries exchange.
    &["sharding", "order"],
    // The node's metrics registry, over every layer's series.
    &["metrics"],
    // The bridge from the broker into the entities.
    &["bridge"],
    // A whole node; the test kit.
    &["node", "testkit"],
];

const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 100;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source of `path` without its tests (a `tests.rs` file or a trailing `mod tests`), or
/// `None` for a test file.
fn non_test_source(path: &Path) -> Option<String> {
    // Relative to the workspace: a checkout under a folder named `tests` is not all tests.
    let relative = path.strip_prefix(root()).unwrap_or(path);
    let is_test_file = relative.file_name().is_some_and(|n| n == "tests.rs")
        || relative.components().any(|c| c.as_os_str() == "tests");
    if is_test_file {
        return None;
    }
    let text = fs::read_to_string(path).expect("read a source file");
    let cut = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    Some(text[..cut].to_owned())
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`; `src/lib.rs` is the root.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("a file under src");
    let mut segments: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if segments.last().is_some_and(|s| s == "mod" || s == "lib") {
        segments.pop();
    }
    segments
}

/// The text with comments blanked out, so doc links do not count as imports.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path that starts at `crate::` or `super::` in `text`, use trees expanded.
fn paths_in(text: &str) -> Vec<(bool, Vec<String>)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &text[at..];
        let start = if rest.starts_with("crate::") {
            Some((false, "crate::".len()))
        } else if rest.starts_with("super::") {
            Some((true, "super::".len()))
        } else {
            None
        };
        let preceded_by_ident = at > 0 && is_ident(bytes[at - 1]);
        match start {
            Some((relative, skip)) if !preceded_by_ident => {
                let mut prefix = Vec::new();
                if relative {
                    prefix.push("super".to_owned());
                }
                let end = expand(text, at + skip, prefix, &mut |path| {
                    found.push((relative, path))
                });
                at = end.max(at + 1);
            }
            _ => at += 1,
        }
    }
    found
}

fn is_ident(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// Reads one path (tree) at `at`, calling `emit` for every full path; returns where it ended.
fn expand(
    text: &str,
    mut at: usize,
    mut prefix: Vec<String>,
    emit: &mut dyn FnMut(Vec<String>),
) -> usize {
    let bytes = text.as_bytes();
    loop {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if at < bytes.len() && bytes[at] == b'{' {
            at += 1;
            loop {
                while at < bytes.len() && (bytes[at].is_ascii_whitespace() || bytes[at] == b',') {
                    at += 1;
                }
                if at >= bytes.len() || bytes[at] == b'}' {
                    return at + 1;
                }
                at = expand(text, at, prefix.clone(), emit);
            }
        }
        let start = at;
        while at < bytes.len() && is_ident(bytes[at]) {
            at += 1;
        }
        let segment = &text[start..at];
        if segment.is_empty() {
            emit(prefix);
            return at;
        }
        if segment != "self" {
            prefix.push(segment.to_owned());
        }
        if text[at..].starts_with("::") {
            at += 2;
        } else {
            emit(prefix);
            // A rename (`as x`) or anything else ends this path.
            while at < bytes.len() && !matches!(bytes[at], b',' | b'}' | b';' | b'\n') {
                at += 1;
            }
            return at;
        }
    }
}

/// The library's modules and the modules each one imports (outside its tests).
fn imports() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let sources: BTreeMap<Vec<String>, Option<String>> = files
        .iter()
        .map(|file| (module_of(&src, file), non_test_source(file)))
        .collect();
    let modules: BTreeSet<Vec<String>> = sources.keys().cloned().collect();
    // Guards against reading nothing (a wrong root) and calling that a pass.
    assert!(modules.len() > 40, "only {} modules found", modules.len());
    let mut graph = BTreeMap::new();
    for (module, source) in &sources {
        let Some(source) = source else { continue };
        let mut targets = BTreeSet::new();
        for (relative, path) in paths_in(&without_comments(source)) {
            let mut full = if relative { module.clone() } else { Vec::new() };
            for segment in path {
                if segment == "super" {
                    full.pop();
                } else {
                    full.push(segment);
                }
            }
            // The longest prefix that is a module is the file the name comes from.
            let target = (1..=full.len())
                .rev()
                .map(|n| full[..n].to_vec())
                .find(|prefix| modules.contains(prefix));
            if let Some(target) = target
                && &target != module
            {
                targets.insert(target);
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

fn layer_of(top: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&top))
        .unwrap_or_else(|| panic!("module `{top}` is in no layer: add it to LAYERS"))
}

#[test]
fn every_module_imports_only_lower_layers() {
    let mut wrong = Vec::new();
    for (module, targets) in imports() {
        let Some(from) = module.first() else { continue };
        for target in targets {
            let Some(to) = target.first() else { continue };
            if from != to && layer_of(to) >= layer_of(from) {
                wrong.push(format!(
                    "{} imports {}",
                    module.join("::"),
                    target.join("::")
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_file_imports_in_a_circle() {
    let graph = imports();
    // Depth-first search; a node met again while on the stack closes a circle.
    fn visit(
        node: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            return Some(stack[at..].to_vec());
        }
        if !done.insert(node.clone()) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, stack, done) {
                return Some(circle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let mut stack = Vec::new();
        if let Some(circle) = visit(node, &graph, &mut stack, &mut done) {
            let names: Vec<String> = circle.iter().map(|m| m.join("::")).collect();
            panic!("import circle: {}", names.join(" -> "));
        }
    }
}

/// Non-test sources of the whole workspace.
fn workspace_sources() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for dir in [
        "src",
        "consumer-app/src",
        "producer-app/src",
        "benches",
        "examples",
    ] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 60, "only {} source files found", files.len());
    files
        .into_iter()
        .filter_map(|file| non_test_source(&file).map(|text| (file, text)))
        .collect()
}

#[test]
fn no_source_file_is_longer_than_800_lines() {
    let long: Vec<String> = workspace_sources()
        .into_iter()
        .filter(|(_, text)| text.lines().count() > MAX_FILE_LINES)
        .map(|(file, text)| format!("{}: {} lines", file.display(), text.lines().count()))
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_FILE_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn no_function_is_longer_than_100_lines() {
    let mut long = Vec::new();
    for (file, text) in workspace_sources() {
        let lines: Vec<&str> = text.lines().collect();
        for (start, line) in lines.iter().enumerate() {
            if !starts_a_function(line) {
                continue;
            }
            let (mut depth, mut opened, mut end) = (0i64, false, start);
            for (at, line) in lines.iter().enumerate().skip(start) {
                end = at;
                let code = without_comments(line);
                depth += code.matches('{').count() as i64 - code.matches('}').count() as i64;
                opened |= code.contains('{');
                if (opened && depth <= 0) || (!opened && code.trim_end().ends_with(';')) {
                    break;
                }
            }
            let length = end - start + 1;
            if length > MAX_FN_LINES {
                long.push(format!("{}:{}: {length} lines", file.display(), start + 1));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

fn starts_a_function(line: &str) -> bool {
    let mut words = line.split_whitespace().peekable();
    while let Some(word) = words.peek() {
        if word.starts_with("pub") || *word == "async" || *word == "const" || *word == "unsafe" {
            words.next();
        } else {
            break;
        }
    }
    words.next() == Some("fn")
}

#[test]
fn the_reader_finds_use_trees_renames_and_relative_paths() {
    let text = "use crate::a::{b::C, d as e, self};\nlet x = super::f::g();\nuse crate::h::*;";
    let found: Vec<String> = paths_in(text)
        .into_iter()
        .map(|(relative, path)| format!("{}{}", if relative { "~" } else { "" }, path.join("::")))
        .collect();
    assert_eq!(found, ["a::b::C", "a::d", "a", "~super::f::g", "h"]);
}
