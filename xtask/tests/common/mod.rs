//! Helpers shared by xtask's integration tests: skipping with a printed reason, or failing where every
//! test must really run (the rule itself is userspace/tests/common/skip.rs, shared).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

#[path = "../../../userspace/tests/common/skip.rs"]
mod skip;
pub use skip::skip;

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

/// True when the test runs as root; otherwise skips (or fails under CI, see `skip`).
pub fn require_root(what: &str) -> bool {
    is_root() || skip(&format!("{what} needs root"))
}
