//! Helpers shared by xtask's integration tests: skipping with a printed reason, or failing where every
//! test must really run (mirrors userspace/tests/common/mod.rs).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Whether a skipped test must fail instead: under `cargo xtask test` (RICOCHET_REQUIRE_TOOLS=1) and
/// in CI (CI=true) every test must really run.
pub fn skips_fail() -> bool {
    std::env::var_os("RICOCHET_REQUIRE_TOOLS").is_some()
        || std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Skips a test with a printed reason, or fails it when skips must fail (see [`skips_fail`]).
/// Returns false so callers can write `if !cond { return skip(..) }`.
pub fn skip(reason: &str) -> bool {
    if skips_fail() {
        panic!(
            "cannot run this test: {reason} (RICOCHET_REQUIRE_TOOLS or CI is set, so a skip fails)"
        );
    }
    eprintln!("SKIP: {reason}");
    false
}

/// True when the test runs as root; otherwise skips (or fails under CI, see [`skip`]).
pub fn require_root(what: &str) -> bool {
    is_root() || skip(&format!("{what} needs root"))
}
