//! The wrapper layer (`src/opensips/`) knows nothing of what is built on
//! it: no file there names a path of the crate outside `crate::opensips`
//! (the module, the pure rules), so it could be a crate of its own.

use std::fs;
use std::path::Path;

/// `file:line: text` for each path out of the layer in `dir`'s Rust files.
fn paths_out_of(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).expect("src/opensips") {
        let path = entry.expect("a directory entry").path();
        let text = fs::read_to_string(&path).expect("a source file");
        for (n, line) in text.lines().enumerate() {
            // comments may name anything
            let code = line.split("//").next().unwrap_or_default();
            let out = code
                .match_indices("crate::")
                .any(|(i, _)| !code[i..].starts_with("crate::opensips"))
                || code.contains("super::super")
                || (path.ends_with("mod.rs") && code.contains("super::"));
            if out {
                found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn the_wrapper_layer_imports_nothing_from_outside() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/opensips");
    let found = paths_out_of(&dir);
    assert!(
        found.is_empty(),
        "src/opensips/ imports from outside the wrapper layer:\n{}",
        found.join("\n")
    );
}
