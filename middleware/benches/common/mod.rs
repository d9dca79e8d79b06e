//! What the benches of this crate share: where and how they write results.

use std::path::{Path, PathBuf};

/// The short hash of the commit measured (empty outside a git checkout).
pub(crate) fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Writes `doc` as `<name>.json` in `$GRATIFY_BENCH_DIR`, or in
/// `target/gratify-bench` of the workspace.
pub(crate) fn write(name: &str, doc: &serde_json::Value) {
    let dir = std::env::var_os("GRATIFY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gratify-bench"));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(doc).unwrap()).unwrap();
    eprintln!("wrote {}", path.display());
}
