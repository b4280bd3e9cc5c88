//! `cargo xtask`: what cargo alone cannot express. `test` installs the system tools the tests need
//! (as root) and runs the whole test suite; `lab` builds and removes the veth lab; `run` puts
//! ricochet on a NIC; `fuzz` runs the cargo-fuzz targets for a bounded time; `report` turns
//! bench/latency.sh's runs into its report.
//!
//! xtask deliberately does not depend on the ricochet crate: ricochet's build script needs clang,
//! which `cargo xtask test` may first have to install.
// Unsafe code is allowed only in `run` (signal handling), each block with a SAFETY comment.
#![deny(unsafe_code)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

mod fuzz;
mod package;
mod packages;
mod report;
mod report_http;
mod report_loopback;
mod run;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  test [ARGS...]        install missing test tools (as root) and run the whole test suite;
                        ARGS go to cargo test (e.g. -- --nocapture)
  lab up [--queues N]   two network namespaces joined by a veth pair with N queues (default 2):
                        ricochet-srv (veth-srv, 198.18.0.1/30) and ricochet-cli (veth-cli,
                        198.18.0.2/30), no default route, XDP_PASS on veth-cli; idempotent
  lab down              remove the lab
  run --iface IF [--mode afxdp|xdp|kernel] [--profile FILE] [-- SERVE ARGS]
                        check prerequisites, build, apply the profile, run ricochet serve on IF
                        (listeners on its address, HTTP on 127.0.0.1:9100); Ctrl-C stops it; the
                        profile is reverted however ricochet ends (also when it fails to start)
  fuzz [--seconds N] [TARGET...]
                        build the cargo-fuzz targets in fuzz/ and run each (default all) for N
                        seconds (default 30) from its seeds; fails naming every crashing input
  package [--check]     the Debian package (cargo deb); --check (root) installs it here with
                        dpkg -i, runs /usr/bin/ricochet --version, verifies the unit, loads the
                        shipped configuration, then purges it
  report DIR            results.md and latency.svg from the runs bench/latency.sh recorded in DIR
  report loopback DIR   loopback.md from the runs bench/loopback.sh recorded in DIR
  report http RUNS OUT  the HTTP table (OUT, markdown) from the runs bench/http.sh recorded in RUNS";

/// `report DIR` (the main job), `report loopback DIR`, `report http RUNS OUT`.
fn report_command(args: &[String]) -> anyhow::Result<()> {
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["loopback", dir] => report_loopback::run(Path::new(dir)),
        ["http", runs, out] => report_http::run(Path::new(runs), Path::new(out)),
        [dir] if dir != "loopback" && dir != "http" => report::run(Path::new(dir)),
        _ => Err(anyhow::anyhow!(
            "usage: cargo xtask report RESULTS_DIR | report loopback DIR | report http RUNS OUT"
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("lab") => lab(&args[1..]),
        Some("run") => run::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("package") => package::run_command(&args[1..]),
        Some("report") => report_command(&args[1..]),
        Some("help" | "-h" | "--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown task '{other}'\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Whether a tool is installed: on PATH, or in an sbin directory a normal user's PATH leaves out
/// (Debian puts ethtool and nft in /usr/sbin).
fn have(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).exists();
    }
    let on_path = Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success());
    on_path
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(tool).exists())
}

/// Installs the Debian packages of missing tools when root, or says exactly what to run.
fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages = missing.join(" ");
    if !is_root() {
        bail!("missing system packages: run 'sudo apt-get install -y {packages}' (or run this as root)");
    }
    eprintln!("xtask: installing {packages}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get could not install {packages}"))?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd.get_program());
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    ensure_tools(&packages::group("test"))?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // xtask's lab test drives target/debug/ricochet, which `cargo test` builds only when the ricochet
    // package is among the selected ones: build it first, whatever ARGS select.
    run(Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["build", "-p", "ricochet", "--bin", "ricochet"]))
    .context("cannot build the debug ricochet binary the lab test runs")?;
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["test", "--workspace", "--all-targets"])
        .args(extra);
    // Every tool is installed now, so a test must not skip for a missing one.
    cmd.env("RICOCHET_REQUIRE_TOOLS", "1");
    run(&mut cmd).context("tests failed")
}

const SERVER_NS: &str = "ricochet-srv";
const CLIENT_NS: &str = "ricochet-cli";
const SERVER_IF: &str = "veth-srv";
const CLIENT_IF: &str = "veth-cli";
const SERVER_ADDR: &str = "198.18.0.1";
const CLIENT_ADDR: &str = "198.18.0.2";

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn lab(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("up") => {
            let queues = match args.get(1).map(String::as_str) {
                None => 2,
                Some("--queues") => args
                    .get(2)
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| anyhow::anyhow!("--queues takes a number from 1 to 64"))?,
                Some(other) => bail!("unknown argument '{other}' to lab up: use --queues N"),
            };
            lab_up(queues)
        }
        Some("down") => lab_down(),
        _ => bail!("usage: cargo xtask lab up [--queues N] | cargo xtask lab down"),
    }
}

fn ns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// The number of RX queues of an interface inside a namespace, or None if it does not exist.
fn queues_of(ns: &str, iface: &str) -> Option<u32> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ls",
            &format!("/sys/class/net/{iface}/queues"),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|e| e.starts_with("rx-"))
            .count() as u32,
    )
}

fn client_has_xdp() -> bool {
    Command::new("ip")
        .args(["-n", CLIENT_NS, "link", "show", "dev", CLIENT_IF])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
        .unwrap_or(false)
}

fn lab_up(queues: u32) -> Result<()> {
    if !is_root() {
        bail!("the lab needs root (network namespaces): run 'sudo cargo xtask lab up'");
    }
    ensure_tools(&packages::group("lab"))?;
    let current = (ns_exists(SERVER_NS) && ns_exists(CLIENT_NS))
        .then(|| queues_of(SERVER_NS, SERVER_IF))
        .flatten();
    if current == Some(queues) {
        println!("lab already up ({queues} queues)");
        if !client_has_xdp() {
            attach_client_pass()?;
        }
    } else {
        if current.is_some() || ns_exists(SERVER_NS) || ns_exists(CLIENT_NS) {
            lab_down()?;
        }
        let q = queues.to_string();
        ip(&["netns", "add", SERVER_NS])?;
        ip(&["netns", "add", CLIENT_NS])?;
        ip(&[
            "link",
            "add",
            SERVER_IF,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            SERVER_NS,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IF,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            CLIENT_NS,
        ])?;
        for (ns, iface, addr) in [
            (SERVER_NS, SERVER_IF, SERVER_ADDR),
            (CLIENT_NS, CLIENT_IF, CLIENT_ADDR),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", iface])?;
            ip(&["-n", ns, "link", "set", iface, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        attach_client_pass()?;
        println!("lab up: {queues} queues");
    }
    println!(
        "  {SERVER_NS}: {SERVER_IF} {SERVER_ADDR}/30    {CLIENT_NS}: {CLIENT_IF} {CLIENT_ADDR}/30    (no default route)
  {CLIENT_IF} runs an XDP_PASS program so that XDP_TX replies (--mode xdp) reach it

run a server:
  sudo ip netns exec {SERVER_NS} target/release/ricochet serve --mode afxdp --iface {SERVER_IF} --listen udp://{SERVER_ADDR}:7777
  sudo ip netns exec {SERVER_NS} target/release/ricochet serve --mode xdp --iface {SERVER_IF} --listen udp://{SERVER_ADDR}:7777
  sudo ip netns exec {SERVER_NS} target/release/ricochet serve --mode kernel --listen udp://{SERVER_ADDR}:7777
run the bench:
  sudo ip netns exec {CLIENT_NS} target/release/ricochet bench udp://{SERVER_ADDR}:7777 --duration 10s
tear down:
  sudo cargo xtask lab down"
    );
    Ok(())
}

/// XDP_TX frames sent into a veth reach the peer only when the peer has an XDP program: attach an
/// XDP_PASS program to the client side (compiled here from ebpf/pass.bpf.c).
fn attach_client_pass() -> Result<()> {
    ensure_tools(&packages::group("lab"))?;
    let root = workspace_root();
    let out_dir = root.join("target/xtask-ebpf");
    std::fs::create_dir_all(&out_dir)?;
    let object = out_dir.join("pass.bpf.o");
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "x86_64-linux-gnu".into());
    run(Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(root.join("ebpf/pass.bpf.c"))
        .arg("-o")
        .arg(&object))
    .context("cannot compile ebpf/pass.bpf.c")?;
    ip(&[
        "-n",
        CLIENT_NS,
        "link",
        "set",
        "dev",
        CLIENT_IF,
        "xdpdrv",
        "obj",
        &object.to_string_lossy(),
        "sec",
        "xdp",
    ])
    .context("cannot attach the XDP_PASS program to the client side")
}

fn lab_down() -> Result<()> {
    if !is_root() {
        bail!("the lab needs root: run 'sudo cargo xtask lab down'");
    }
    let mut removed = false;
    for ns in [SERVER_NS, CLIENT_NS] {
        if ns_exists(ns) {
            // Deleting a namespace deletes its end of the veth pair, and with it the peer.
            ip(&["netns", "del", ns])?;
            removed = true;
        }
    }
    println!(
        "{}",
        if removed {
            "lab down"
        } else {
            "lab was not up"
        }
    );
    Ok(())
}
