//! Hardware profiles: every shipped profile parses; the veth-lab profile passes `hw check` on a lab
//! after `hw apply`, and `hw revert` restores what it changed; an apply that fails half way leaves a
//! state file that `hw revert` restores; `serve --profile` takes its layout.

mod common;

use std::process::Command;

use common::*;
use ricochet::hw::Profile;

const PROFILES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../hw-profiles");

#[test]
fn every_shipped_profile_parses() {
    let mut n = 0;
    for entry in std::fs::read_dir(PROFILES).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let p = Profile::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(!p.queues.is_empty());
            n += 1;
        }
    }
    assert!(n >= 6, "veth-lab plus the five NIC profiles");
}

#[test]
fn unknown_fields_and_impossible_layouts_are_rejected() {
    let base = std::fs::read_to_string(format!("{PROFILES}/veth-lab.toml")).unwrap();
    let typo = base.replace("channels = 2", "channels = 2\nchanels = 2");
    assert!(format!("{:#}", Profile::parse(&typo).unwrap_err()).contains("chanels"));
    let beyond = base.replace("id = 1", "id = 7");
    assert!(format!("{:#}", Profile::parse(&beyond).unwrap_err()).contains("beyond"));
    let overlap = base.replace("housekeeping_cpus = [0]", "housekeeping_cpus = [1]");
    assert!(format!("{:#}", Profile::parse(&overlap).unwrap_err()).contains("housekeeping"));
    for bad in ["", "..", "../../tmp", "eth0:1", "a b", "sixteen-bytes-xx"] {
        let named = base.replace("name = \"veth-srv\"", &format!("name = {bad:?}"));
        assert!(
            format!("{:#}", Profile::parse(&named).unwrap_err())
                .contains("not a Linux interface name"),
            "{bad:?} is refused"
        );
    }
}

/// `ricochet hw ARGS` on the real root (default) or a fake tree (`--root`); (success, stdout + stderr).
fn hw_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).arg("hw").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn an_apply_that_fails_half_way_can_be_reverted() {
    // A fake tree where napi_defer_hard_irqs can be set but gro_flush_timeout cannot be read.
    let root = temp_path("hw-half-way");
    let _ = std::fs::remove_dir_all(&root);
    let net = root.join("sys/class/net/veth-srv");
    std::fs::create_dir_all(net.join("queues/rx-0")).unwrap();
    std::fs::create_dir_all(net.join("queues/rx-1")).unwrap();
    std::fs::write(net.join("napi_defer_hard_irqs"), "0\n").unwrap();
    std::fs::create_dir_all(net.join("gro_flush_timeout")).unwrap();
    let profile = format!("{PROFILES}/veth-lab.toml");
    let root_arg = root.to_str().unwrap();
    let (ok, out) = hw_cli(&[
        "apply",
        &profile,
        "--state",
        "/state.json",
        "--root",
        root_arg,
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("1 change(s) were made before the failure")
            && out.contains("napi_defer_hard_irqs (was 0)")
            && out.contains("ricochet hw revert --state"),
        "apply says what it changed and how to undo it: {out}"
    );
    let knob = || std::fs::read_to_string(net.join("napi_defer_hard_irqs")).unwrap();
    assert_eq!(knob().trim(), "2", "the change made before the failure");
    let (ok, out) = hw_cli(&["revert", "--state", "/state.json", "--root", root_arg]);
    assert!(ok && out.contains("reverted 1 change(s)"), "{out}");
    assert_eq!(knob().trim(), "0", "revert restored it");
    assert!(!root.join("state.json").exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// The veth-lab profile with the interface renamed to a test lab's.
fn lab_profile(lab: &LabNet) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("{PROFILES}/veth-lab.toml")).unwrap();
    let path = temp_path(&format!("veth-lab-{}.toml", lab.server_if));
    std::fs::write(
        &path,
        text.replace("\"veth-srv\"", &format!("\"{}\"", lab.server_if)),
    )
    .unwrap();
    path
}

fn hw(lab: &LabNet, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.server_ns, BIN, "hw"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn veth_lab_check_apply_revert() {
    if !require_tool("ethtool", "ethtool") {
        return;
    }
    let Some(lab) = LabNet::create("h", 2) else {
        return;
    };
    let profile = lab_profile(&lab);
    let profile = profile.to_str().unwrap();
    let state = temp_path(&format!("hw-state-{}.json", lab.server_if));
    let state = state.to_str().unwrap();
    let knob = || {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.server_ns,
                "cat",
                &format!("/sys/class/net/{}/napi_defer_hard_irqs", lab.server_if),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let before = knob();
    let (ok, out) = hw(&lab, &["check", profile]);
    assert!(
        !ok,
        "a fresh lab differs from the profile (NAPI knobs):\n{out}"
    );
    assert!(
        out.contains("napi_defer_hard_irqs") && out.contains("NO"),
        "{out}"
    );
    let (ok, out) = hw(&lab, &["apply", profile, "--state", state]);
    assert!(ok, "{out}");
    let (ok, out) = hw(&lab, &["check", profile]);
    assert!(ok, "check passes after apply:\n{out}");
    assert!(
        out.contains("veth"),
        "the driver is read with ethtool -i: {out}"
    );
    let (ok, out) = hw(&lab, &["revert", "--state", state]);
    assert!(ok, "{out}");
    assert_eq!(knob(), before, "revert restores the previous value");
    let (ok, _) = hw(&lab, &["check", profile]);
    assert!(!ok);
}

#[test]
fn serve_takes_its_layout_from_a_profile() {
    let Some(lab) = LabNet::create("p", 2) else {
        return;
    };
    let profile = lab_profile(&lab);
    let server = Server::start_in(
        Some(&lab.server_ns),
        &[
            "--mode",
            "afxdp",
            "--profile",
            profile.to_str().unwrap(),
            "--listen",
            "udp://198.18.0.1:7777",
            "--poll",
            "block",
        ],
    );
    let spec = format!("udp://{LAB_SERVER}:7777");
    let r = bench_json_in(
        &lab,
        &[&spec, "-c", "8", "--requests", "400", "--timeout", "2s"],
    );
    assert_eq!(r["received"], 400);
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    // Both queues of the profile, each on its worker CPU (1).
    assert!(
        output.contains("afxdp queue=0 cpu=1") && output.contains("afxdp queue=1 cpu=1"),
        "{output}"
    );
}
