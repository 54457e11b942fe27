//! The layers point one way: the import graph of the crate's top-level
//! modules (from `crate::` paths outside `#[cfg(test)]` modules and
//! comments) has no cycle, the bottom layer imports nothing of the crate,
//! and the OS layers never reach up into configuration, datapath or
//! engines. `cargo test --test layers -- --nocapture` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// `text` without comments, string literals' contents, and
/// `#[cfg(test)] mod NAME { ... }` blocks.
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(b.len(), |e| i + 4 + e);
            i = end;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i..].starts_with(b"#[cfg(test)]") {
            // A test module: skip to its matching closing brace. Any other
            // item under cfg(test) (a function, a use) is skipped to its
            // end too.
            let rest = &text[i..];
            let brace = rest.find('{');
            let semi = rest.find(';');
            match (brace, semi) {
                (Some(o), s) if s.is_none_or(|s| o < s) => {
                    let mut depth = 0usize;
                    let mut j = i + o;
                    while j < b.len() {
                        match b[j] {
                            b'{' => depth += 1,
                            b'}' => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        j += 1;
                    }
                    i = j + 1;
                }
                (_, Some(s)) => i += s + 1,
                _ => i = b.len(),
            }
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The first path segments of every `crate::` path in `code`, with
/// grouped imports (`crate::{a, b::{c, d}}`) opened.
fn crate_targets(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // e.g. `$crate::` in a macro, or `mycrate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            // The top-level names of the group, up to its closing brace.
            let mut depth = 1;
            let mut start = true;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start && depth == 1 => {
                        found.insert(ident(&group[k..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found
}

/// The import graph of the crate's top-level modules.
fn module_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            let mut files = Vec::new();
            rust_files(&p, &mut files);
            modules.insert(name, files);
        } else if p.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            modules.insert(name, vec![p]);
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(m, files)| {
            let mut deps = BTreeSet::new();
            for f in files {
                let code = strip(&std::fs::read_to_string(f).unwrap());
                deps.extend(
                    crate_targets(&code)
                        .into_iter()
                        .filter(|d| names.contains(d) && d != m),
                );
            }
            (m.clone(), deps)
        })
        .collect()
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in &self.g[v] {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    comp.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.found.push(comp);
                }
            }
        }
    }
    let mut t = Tarjan {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.found
}

fn print(g: &Graph) {
    for (m, deps) in g {
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        println!("{m} -> {}", deps.join(", "));
    }
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let g = module_graph();
    print(&g);
    let found = cycles(&g);
    assert!(
        found.is_empty(),
        "import cycles between top-level modules: {}",
        found
            .iter()
            .map(|c| c.join(" <-> "))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

#[test]
fn bottom_and_os_layers_point_down() {
    let g = module_graph();
    for bottom in ["types", "packet", "error"] {
        assert!(
            g[bottom].is_empty(),
            "{bottom} is a bottom layer but imports {:?}",
            g[bottom]
        );
    }
    for os in ["device", "sys", "platform", "stats", "peers"] {
        for above in ["config", "datapath", "engine", "runtime", "forward", "cli"] {
            assert!(
                !g[os].contains(above),
                "{os} imports {above}, a layer above it"
            );
        }
    }
}

/// The checker itself finds what it should: a cycle it is shown, the
/// names of a nested group, and nothing in comments, strings or tests.
#[test]
fn checker_sees_cycles_groups_and_ignores_tests() {
    let mut g = Graph::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), ["a".to_string()].into());
    g.insert("d".into(), ["a".to_string()].into());
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);

    let code = strip(
        "use crate::{x::{Y, Z}, w};\n// crate::comment\nlet s = \"crate::string\";\n\
         #[cfg(test)]\nmod tests { use crate::tested; }\nfn f() { crate::v::g() }\n",
    );
    let found: Vec<String> = crate_targets(&code).into_iter().collect();
    assert_eq!(found, ["v", "w", "x"]);
}
