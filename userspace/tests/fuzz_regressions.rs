//! Replays every saved fuzz input (fuzz/corpus/TARGET/ seeds and fuzz/regressions/TARGET/ crash
//! inputs) through the fuzz targets' bodies in `ricochet::fuzzing`, so an input that once crashed a
//! target stays a test after the fix. A directory named after no target fails the test.

use std::path::{Path, PathBuf};

use ricochet::fuzzing::{Target, TARGETS};

const FUZZ: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz");

/// Every file in every TARGET directory under `dir`, with its target's body.
fn inputs(dir: &Path) -> Vec<(PathBuf, Target)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut inputs = Vec::new();
    for entry in entries {
        let target_dir = entry.unwrap().path();
        if !target_dir.is_dir() {
            continue;
        }
        let name = target_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let Some(&(_, body)) = TARGETS.iter().find(|(target, _)| *target == name) else {
            panic!(
                "{} is named after no fuzz target (targets: {:?})",
                target_dir.display(),
                TARGETS.iter().map(|(t, _)| t).collect::<Vec<_>>()
            );
        };
        for file in std::fs::read_dir(&target_dir).unwrap() {
            inputs.push((file.unwrap().path(), body));
        }
    }
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    inputs
}

/// Runs each input, collecting the paths of those that panic (all of them, not just the first).
fn replay(inputs: &[(PathBuf, Target)]) -> Vec<String> {
    let mut failed = Vec::new();
    for (path, body) in inputs {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    failed
}

#[test]
fn every_seed_passes_its_target() {
    let seeds = inputs(&Path::new(FUZZ).join("corpus"));
    for (target, _) in TARGETS {
        let n = seeds
            .iter()
            .filter(|(path, _)| path.parent().unwrap().ends_with(target))
            .count();
        assert!(
            n >= 5,
            "fuzz/corpus/{target}/ holds {n} seeds: the corpus is missing"
        );
    }
    let failed = replay(&seeds);
    assert!(failed.is_empty(), "seeds that fail: {failed:#?}");
}

#[test]
fn every_saved_crash_input_passes_its_target() {
    let saved = inputs(&Path::new(FUZZ).join("regressions"));
    assert!(!saved.is_empty(), "fuzz/regressions/ holds no input");
    let failed = replay(&saved);
    assert!(
        failed.is_empty(),
        "crash inputs that fail again: {failed:#?}"
    );
}
