//! The skip rule every test crate shares (userspace's tests include it as a module, xtask's through
//! `#[path]`): a test that cannot run prints why and passes, except where every test must really
//! run, where it fails.

/// Whether an environment flag is on: set to anything but empty, `0` or `false`.
fn flag_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether a skipped test must fail instead: under `cargo xtask test` (RICOCHET_REQUIRE_TOOLS=1) and
/// in CI (CI=true) every test must really run.
pub fn skips_fail() -> bool {
    flag_on("RICOCHET_REQUIRE_TOOLS") || flag_on("CI")
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
