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

/// A small deterministic generator (SplitMix64).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// A uniform draw in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The `p` quantile of `sorted` (nearest rank; NaN when empty). Exact, on
/// the few thousand samples a run keeps, where hdrhistogram would bucket
/// them.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
