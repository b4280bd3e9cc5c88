//! `cargo xtask fuzz [--seconds N] [TARGET...]`: build the cargo-fuzz targets in fuzz/ once, then run
//! each for a bounded time from its seed corpus (fuzz/corpus/TARGET, read only; what the fuzzer
//! learns goes to target/fuzz-corpus/TARGET). Fails, naming each crashing input, when a target
//! crashes, times out or runs out of memory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workspace_root;

const USAGE: &str = "usage: cargo xtask fuzz [--seconds N] [TARGET...]";

/// Flags every build and run shares: no sanitizer (stable Rust), a debug build (one build of all of
/// ricochet's dependencies in about a third of the release build's time, with debug assertions
/// and overflow checks).
const BUILD_FLAGS: &[&str] = &["--sanitizer", "none", "--dev"];

/// One input taking longer than this is a hang (libFuzzer writes it as `timeout-*`).
const INPUT_TIMEOUT_SECONDS: u32 = 10;

#[derive(Debug)]
struct FuzzArgs {
    seconds: u32,
    targets: Vec<String>,
}

fn parse(args: &[String], known: &[String]) -> Result<FuzzArgs> {
    let mut seconds = 30;
    let mut targets = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--seconds" => {
                seconds = args
                    .get(i + 1)
                    .and_then(|s| s.parse::<u32>().ok())
                    .filter(|s| (1..=86_400).contains(s))
                    .with_context(|| format!("--seconds takes 1 to 86400\n{USAGE}"))?;
                i += 1;
            }
            name if known.iter().any(|k| k == name) => targets.push(name.to_string()),
            other => bail!("unknown fuzz target or flag '{other}': targets are {known:?}\n{USAGE}"),
        }
        i += 1;
    }
    if targets.is_empty() {
        targets = known.to_vec();
    }
    Ok(FuzzArgs { seconds, targets })
}

/// The targets: one file per target in fuzz/fuzz_targets/.
fn known_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| {
            e.ok()?
                .path()
                .file_stem()
                .map(|s| s.to_string_lossy().into())
        })
        .collect();
    names.sort();
    Ok(names)
}

fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).arg("fuzz");
    cmd
}

/// The files libFuzzer has written for a target (crash-*, timeout-*, oom-*).
fn artifacts(fuzz_dir: &Path, target: &str) -> BTreeSet<PathBuf> {
    std::fs::read_dir(fuzz_dir.join("artifacts").join(target))
        .map(|dir| dir.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}

pub fn run(args: &[String]) -> Result<()> {
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    let r = parse(args, &known_targets(&fuzz_dir)?)?;
    let installed = cargo_fuzz(&root)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        bail!("cargo-fuzz is not installed: run 'cargo install cargo-fuzz --locked' (about 2 minutes)");
    }
    let status = cargo_fuzz(&root)
        .arg("build")
        .args(BUILD_FLAGS)
        .status()
        .context("cannot run cargo fuzz build")?;
    if !status.success() {
        bail!("the fuzz targets do not build (see above)");
    }
    let mut failures = Vec::new();
    for target in &r.targets {
        if let Some(failure) = run_target(&root, target, r.seconds)? {
            failures.push(failure);
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} fuzz targets failed:\n{}\nreproduce with 'cargo fuzz run {} TARGET INPUT'; with the fix, save the input \
             under fuzz/regressions/TARGET/ so tests/fuzz_regressions.rs replays it",
            failures.len(),
            r.targets.len(),
            failures.join("\n"),
            BUILD_FLAGS.join(" ")
        );
    }
    println!(
        "fuzzing: {} target(s), {} s each, no failure",
        r.targets.len(),
        r.seconds
    );
    Ok(())
}

/// Runs one target for `seconds`; Some(description naming the inputs) when it failed.
fn run_target(root: &Path, target: &str, seconds: u32) -> Result<Option<String>> {
    let fuzz_dir = root.join("fuzz");
    let scratch = root.join("target/fuzz-corpus").join(target);
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let before = artifacts(&fuzz_dir, target);
    println!("== fuzz {target} ({seconds} s)");
    let status = cargo_fuzz(root)
        .arg("run")
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(&scratch)
        .arg(fuzz_dir.join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .status()
        .with_context(|| format!("cannot run cargo fuzz run {target}"))?;
    if status.success() {
        return Ok(None);
    }
    let new: Vec<String> = artifacts(&fuzz_dir, target)
        .difference(&before)
        .map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string())
        .collect();
    let inputs = if new.is_empty() {
        "no input saved (see the output above)".to_string()
    } else {
        new.join(", ")
    };
    Ok(Some(format!("  {target} ({status}): {inputs}")))
}

#[cfg(test)]
mod test {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn arguments() {
        let known = args("frame http wire");
        let r = parse(&[], &known).unwrap();
        assert_eq!((r.seconds, r.targets), (30, known.clone()));
        let r = parse(&args("--seconds 5 wire"), &known).unwrap();
        assert_eq!((r.seconds, r.targets), (5, args("wire")));
        assert!(parse(&args("--seconds 0"), &known).is_err());
        assert!(parse(&args("--seconds"), &known).is_err());
        let e = parse(&args("wrie"), &known).unwrap_err().to_string();
        assert!(e.contains("unknown fuzz target or flag 'wrie'"), "{e}");
    }

    #[test]
    fn the_targets_are_the_files_in_fuzz_targets() {
        let known = known_targets(&workspace_root().join("fuzz")).unwrap();
        assert_eq!(known, args("frame http profile spec tcp_lite wire"));
    }
}
