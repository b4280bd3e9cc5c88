//! `cargo xtask lab` and `cargo xtask run` end to end: the lab comes up (idempotently, with XDP_PASS on
//! the client side), `xtask run` serves the responder side in xdp mode with the veth-lab profile,
//! answers requests from the client side, stops on Ctrl-C and reverts the profile; a serve that fails
//! at start leaves the profile reverted too; `lab down` removes everything.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{require_root, root, skip};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn sh(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Removes the lab even when the test fails.
struct LabGuard;
impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Command::new(XTASK).args(["lab", "down"]).output();
    }
}

#[test]
fn lab_up_run_serve_and_down() {
    if !require_root("the lab (network namespaces)") {
        return;
    }
    let ricochet = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("debug/ricochet");
    if !ricochet.exists() {
        skip(&format!(
            "{} is not built (cargo xtask test builds it; or run 'cargo build -p ricochet')",
            ricochet.display()
        ));
        return;
    }
    let _guard = LabGuard;
    let (ok, out) = sh(&[XTASK, "lab", "up", "--queues", "2"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("198.18.0.1"),
        "lab up prints how to use it: {out}"
    );
    let (ok, out) = sh(&[XTASK, "lab", "up", "--queues", "2"]);
    assert!(
        ok && out.contains("already up"),
        "lab up is idempotent: {out}"
    );
    let (_, link) = sh(&[
        "ip",
        "-n",
        "ricochet-cli",
        "link",
        "show",
        "dev",
        "veth-cli",
    ]);
    assert!(
        link.contains("prog/xdp"),
        "the client side runs XDP_PASS: {link}"
    );
    let (_, routes) = sh(&["ip", "-n", "ricochet-cli", "route"]);
    assert!(!routes.contains("default"), "no default route: {routes}");

    let knob = || {
        sh(&[
            "ip",
            "netns",
            "exec",
            "ricochet-srv",
            "cat",
            "/sys/class/net/veth-srv/napi_defer_hard_irqs",
        ])
        .1
        .trim()
        .to_string()
    };
    let before = knob();
    let profile = root().join("hw-profiles/veth-lab.toml");
    // Not run's default /var/lib/ricochet/xtask-run: a test leaves no state on the machine. xdp
    // mode pins its counter in a bpffs, which must be the host's: ip netns exec remounts /sys.
    let state_dir = std::env::temp_dir().join(format!("ricochet-xtask-run-{}", std::process::id()));
    let bpffs = HostBpffs::mount();
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("ip")
            .args([
                "netns",
                "exec",
                "ricochet-srv",
                XTASK,
                "run",
                "--iface",
                "veth-srv",
                "--mode",
                "xdp",
                "--binary",
            ])
            .arg(&ricochet)
            .arg("--profile")
            .arg(&profile)
            .args(["--", "--http", "off", "--state-dir"])
            .arg(&state_dir)
            .arg("--bpffs")
            .arg(&bpffs.0)
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "xtask run ended early:\n{seen}"
        );
        seen.push_str(&line);
        if line.starts_with("ready ") {
            break;
        }
        assert!(Instant::now() < deadline, "no ready line:\n{seen}");
    }
    assert!(seen.contains("ready mode=xdp"), "{seen}");
    assert_eq!(knob(), "2", "the profile was applied");
    let (ok, out) = sh(&[
        "ip",
        "netns",
        "exec",
        "ricochet-cli",
        ricochet.to_str().unwrap(),
        "bench",
        "udp://198.18.0.1:7777",
        "-c",
        "4",
        "--requests",
        "200",
        "--timeout",
        "2s",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("received 200 lost 0"), "{out}");
    // Ctrl-C: SIGINT to the whole process group, as a terminal sends it.
    nix_kill(child.id() as i32);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "xtask run ends cleanly on Ctrl-C: {status}"
    );
    assert_eq!(knob(), before, "the profile was reverted");
    let (_, link) = sh(&[
        "ip",
        "-n",
        "ricochet-srv",
        "link",
        "show",
        "dev",
        "veth-srv",
    ]);
    assert!(!link.contains("prog/xdp"), "nothing left attached: {link}");
    // Ctrl-C synced the counter into the state directory before ricochet exited.
    let snapshots = std::fs::read(state_dir.join("counter.snap")).unwrap_or_default();
    assert!(snapshots.starts_with(b"RICOSNAP") || snapshots.get(4096..4104) == Some(b"RICOSNAP"));
    let _ = std::fs::remove_dir_all(&state_dir);

    // A serve that fails at start (here a CPU outside the allowed set) leaves nothing applied.
    let (ok, out) = sh(&[
        "ip",
        "netns",
        "exec",
        "ricochet-srv",
        XTASK,
        "run",
        "--iface",
        "veth-srv",
        "--mode",
        "xdp",
        "--binary",
        ricochet.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "--",
        "--http",
        "off",
        "--cpus",
        "4095",
        "--state-dir",
        state_dir.to_str().unwrap(),
    ]);
    assert!(!ok, "xtask run fails when ricochet cannot start: {out}");
    assert!(
        out.contains("applied;") && out.contains("exited with"),
        "the profile was applied, then serve failed: {out}"
    );
    assert_eq!(knob(), before, "the profile was reverted: {out}");
    assert!(
        !Path::new("/run/ricochet/xtask-run-veth-srv.json").exists(),
        "no state is left behind"
    );

    let (ok, out) = sh(&[XTASK, "lab", "down"]);
    assert!(ok, "{out}");
    let (_, namespaces) = sh(&["ip", "netns", "list"]);
    assert!(
        !namespaces.contains("ricochet-srv") && !namespaces.contains("ricochet-cli"),
        "{namespaces}"
    );
}

/// A bpffs mounted in the host's mount namespace for the test; unmounted on drop.
struct HostBpffs(PathBuf);

impl HostBpffs {
    fn mount() -> HostBpffs {
        let dir = PathBuf::from(format!(
            "/run/ricochet-xtask-test-{}-bpffs",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (ok, out) = sh(&["mount", "-t", "bpf", "bpf", dir.to_str().unwrap()]);
        assert!(ok, "cannot mount a bpffs: {out}");
        HostBpffs(dir)
    }
}

impl Drop for HostBpffs {
    fn drop(&mut self) {
        let _ = sh(&["umount", self.0.to_str().unwrap()]);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn nix_kill(pgid: i32) {
    // kill -INT -PGID
    let status = Command::new("kill")
        .args(["-INT", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(status.success());
}
