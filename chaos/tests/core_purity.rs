//! The cores stay pure: no file under any crate's `src/core/`, nor the model crate, reads the
//! clock, draws randomness, spawns or does IO.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

use std::path::{Path, PathBuf};

use cellplane_chaos::purity::impurities;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
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

/// Every core file of the workspace: `*/src/core/**` and `api/src/**`.
fn core_files(workspace: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&workspace.join("api/src"), &mut files);
    for entry in std::fs::read_dir(workspace).expect("workspace readable").flatten() {
        rust_files(&entry.path().join("src/core"), &mut files);
    }
    files
}

#[test]
fn no_core_reads_the_clock_draws_randomness_or_does_io() {
    let workspace =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("chaos is in the workspace");
    let files = core_files(workspace);
    // The guard guards something: the model and at least the cell and storage cores.
    for must in ["api/src/wire.rs", "cell/src/core/fencing.rs", "storage/src/core/resolver.rs"] {
        assert!(files.iter().any(|f| f.ends_with(must)), "core file {must} not found by the scan");
    }
    let mut report = String::new();
    for file in &files {
        let source = std::fs::read_to_string(file).expect("core file readable");
        for found in impurities(&source) {
            report += &format!(
                "{}:{}: {} ({})\n",
                file.display(),
                found.line,
                found.pattern,
                found.reason
            );
        }
    }
    assert!(report.is_empty(), "impure cores:\n{report}");
}
