//! Checks that must never go stale: every script the README tells people to run is executable in git
//! (`sudo bench/latency.sh` must not fail with "Permission denied" on a fresh clone).

mod common;

use std::process::Command;

use common::{root, skip};

/// The script paths a text names: `bench/*.sh`, anything under `deploy/` that is a script (a `.sh`
/// or `.py` file, or a file without an extension), and any `*.py` path. Sorted, without duplicates.
fn script_paths(text: &str) -> Vec<String> {
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    let mut paths: Vec<String> = text
        .split(|c: char| !is_path_char(c))
        .map(|token| token.trim_start_matches("./").trim_end_matches('.'))
        .filter(|token| {
            let file = token.rsplit('/').next().unwrap_or(token);
            let bench = token.starts_with("bench/") && token.ends_with(".sh");
            let deploy = token.starts_with("deploy/")
                && !file.is_empty()
                && (!file.contains('.') || file.ends_with(".sh") || file.ends_with(".py"));
            let python = token.contains('/') && token.ends_with(".py");
            bench || deploy || python
        })
        .map(str::to_string)
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

#[test]
fn script_paths_finds_what_the_readme_says_to_run() {
    let text = "Run `sudo bench/latency.sh --quick`, then ./deploy/install and deploy/gen.py.\n\
                See [results](bench/results/2026/results.md), deploy/ricochet.service, deploy/, \
                bench/http.sh; bench/http.sh again and tools/plot.py.";
    assert_eq!(
        script_paths(text),
        [
            "bench/http.sh",
            "bench/latency.sh",
            "deploy/gen.py",
            "deploy/install",
            "tools/plot.py"
        ]
    );
}

/// `git ls-files -s PATH`: the mode git records for a tracked file, or None when git does not track it.
fn git_mode(path: &str) -> Option<String> {
    let out = Command::new("git")
        .current_dir(root())
        .args(["ls-files", "-s", "--", path])
        .output()
        .expect("git ran a moment ago");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().map(str::to_string)
}

fn git_repository_present() -> bool {
    Command::new("git")
        .current_dir(root())
        .args(["rev-parse", "--show-toplevel"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn every_script_the_readme_runs_is_executable_in_git() {
    if !git_repository_present() {
        skip("git or the repository is absent (a source tarball?): the file modes git records cannot be read");
        return;
    }
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let scripts = script_paths(&readme);
    assert!(
        scripts.iter().any(|s| s == "bench/latency.sh"),
        "the README's main job was not found among {scripts:?}: is the pattern stale?"
    );
    let mut wrong = Vec::new();
    for script in &scripts {
        match git_mode(script) {
            Some(mode) if mode == "100755" => {}
            Some(mode) => wrong.push(format!(
                "{script} has mode {mode}: run 'git update-index --chmod=+x {script}'"
            )),
            None => wrong.push(format!(
                "{script} is named in README.md but git does not track it"
            )),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The system packages live in one list, `.ci/packages`: CI, xtask and the bench scripts read it and
/// never name a package themselves, so the list cannot drift from what is installed.
#[test]
fn system_packages_are_listed_once() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let list = std::fs::read_to_string(root.join(".ci/packages")).unwrap();
    let packages: Vec<&str> = list
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(packages.contains(&"sockperf") && packages.contains(&"libbpf-dev"));
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.contains(".ci/packages"),
        ".ci/run must install from .ci/packages"
    );
    for script in ["bench/latency.sh", "bench/loopback.sh", "bench/http.sh"] {
        let text = std::fs::read_to_string(root.join(script)).unwrap();
        assert!(
            text.contains("install_group "),
            "{script} must install through install_group"
        );
        assert!(
            !text.contains("install_missing "),
            "{script} names packages itself"
        );
    }
    let main = std::fs::read_to_string(root.join("xtask/src/main.rs")).unwrap();
    for package in ["\"iproute2\"", "\"libbpf-dev\"", "\"sockperf\""] {
        assert!(
            !main.contains(package),
            "xtask/src/main.rs names {package} itself"
        );
    }
}
