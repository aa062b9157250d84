//! The library's layers (src/lib.rs `# Layout`): dependencies between
//! top-level modules flow one way. This test reads the sources and fails
//! on any import that goes up a layer, across the two back-end/front-end
//! siblings, or round a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layer of each top-level module: a module may use only lower layers
/// (leaves may use other leaves, as long as there is no cycle).
fn layer(module: &str) -> Option<u8> {
    Some(match module {
        "node" => 6,
        "gateway" | "cluster" => 5,
        "bus" => 4,
        "local" => 3,
        "redis" => 2,
        "config" | "ids" | "keys" | "message" | "stream" | "ack" | "metrics" | "shutdown"
        | "backoff" => 1,
        _ => return None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "bin") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules `text` names through `crate::…` paths (unit tests
/// at the end of a file are left out: they may reach anywhere).
fn uses(text: &str) -> BTreeSet<String> {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            for item in group.split('}').next().unwrap_or("").split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

#[test]
fn dependencies_flow_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(from) = layer(&module) else {
            wrong.push(format!("{module}: not in the layer list of this test"));
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for dep in uses(&text) {
            if dep == module {
                continue;
            }
            let Some(to) = layer(&dep) else { continue };
            if to > from || (to == from && from > 1) {
                wrong.push(format!(
                    "{} uses crate::{dep} (layer {from} → {to})",
                    rel.display()
                ));
            }
            edges.entry(module.clone()).or_default().insert(dep);
        }
    }
    // No cycle, leaves included.
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == n) {
            cycles.push(format!("{} → {n}", path[i..].join(" → ")));
            return;
        }
        if !done.insert(n.to_owned()) {
            return;
        }
        path.push(n.to_owned());
        for m in edges.get(n).into_iter().flatten() {
            visit(m, edges, path, done, cycles);
        }
        path.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        visit(n, &edges, &mut Vec::new(), &mut done, &mut cycles);
    }
    wrong.extend(cycles.into_iter().map(|c| format!("cycle: {c}")));
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_imports() {
    let u = uses(
        "use crate::{bus::Bus, local};\nfn f() { crate::redis::lua::X }\n#[cfg(test)]\nmod tests { use crate::node; }",
    );
    assert_eq!(
        u.into_iter().collect::<Vec<_>>(),
        vec!["bus".to_owned(), "local".into(), "redis".into()]
    );
}
