//! `cargo xtask run --iface IF [--mode afxdp|xdp|kernel] [--profile FILE] [-- SERVE ARGS]`: check the
//! prerequisites, build, apply the profile, run `ricochet serve` on the interface with listeners on its
//! address and the HTTP endpoints on loopback; Ctrl-C stops it and reverts the profile.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{ensure_tools, is_root, workspace_root};

#[derive(Debug, Default)]
struct RunArgs {
    iface: String,
    mode: String,
    profile: Option<PathBuf>,
    serve_args: Vec<String>,
    /// A prebuilt ricochet binary instead of building one (tests).
    binary: Option<PathBuf>,
    /// Print the serve command and exit (tests, dry runs).
    dry_run: bool,
}

const USAGE: &str = "usage: cargo xtask run --iface IF [--mode afxdp|xdp|kernel] [--profile FILE] [--dry-run] [-- SERVE ARGS]";

fn parse(args: &[String]) -> Result<RunArgs> {
    let mut r = RunArgs {
        mode: "afxdp".into(),
        ..RunArgs::default()
    };
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| {
            args.get(i + 1)
                .cloned()
                .with_context(|| format!("{} needs a value\n{USAGE}", args[i]))
        };
        match args[i].as_str() {
            "--iface" => r.iface = value(i)?,
            "--mode" => r.mode = value(i)?,
            "--profile" => r.profile = Some(PathBuf::from(value(i)?)),
            "--binary" => r.binary = Some(PathBuf::from(value(i)?)),
            "--dry-run" => {
                r.dry_run = true;
                i += 1;
                continue;
            }
            "--" => {
                r.serve_args = args[i + 1..].to_vec();
                break;
            }
            other => bail!("unknown argument '{other}'\n{USAGE}"),
        }
        i += 2;
    }
    if r.iface.is_empty() {
        bail!("--iface is required: the interface to serve (list them with 'ip link')\n{USAGE}");
    }
    if !["afxdp", "xdp", "kernel"].contains(&r.mode.as_str()) {
        bail!("--mode must be afxdp, xdp or kernel, not '{}'", r.mode);
    }
    Ok(r)
}

/// The first IPv4 address of the interface.
fn ipv4_of(iface: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", iface])
        .output()
        .context("cannot run ip")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
        .with_context(|| {
            format!("{iface} has no IPv4 address: add one ('ip addr add ADDR/PREFIX dev {iface}')")
        })
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

fn driver_of(iface: &str) -> Option<String> {
    let out = Command::new("ethtool").args(["-i", iface]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("driver: ").map(str::to_string))
}

pub fn run(args: &[String]) -> Result<()> {
    let r = parse(args)?;
    if !is_root() {
        bail!(
            "xdp and af_xdp need root: run 'sudo cargo xtask run --iface {}' (or as root)",
            r.iface
        );
    }
    ensure_tools(&[
        ("clang", "clang"),
        ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
        ("ethtool", "ethtool"),
        ("ip", "iproute2"),
    ])?;
    if !Path::new("/sys/class/net").join(&r.iface).exists() {
        bail!("no interface named '{}': list them with 'ip link'", r.iface);
    }
    let (need, what) = match r.mode.as_str() {
        "xdp" => ((5, 12), "BPF atomic fetch-and-add"),
        "afxdp" => ((5, 9), "BPF links and AF_XDP need_wakeup"),
        _ => ((0, 0), ""),
    };
    if !kernel_at_least(need.0, need.1) {
        bail!(
            "--mode {} needs Linux {}.{}+ ({what}); use --mode kernel on this kernel",
            r.mode,
            need.0,
            need.1
        );
    }
    let driver = driver_of(&r.iface).unwrap_or_else(|| "unknown".into());
    let address = ipv4_of(&r.iface)?;
    let root = workspace_root();
    let binary = match &r.binary {
        Some(b) => b.clone(),
        None => {
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(&root)
                .args(["build", "--release", "--quiet", "-p", "ricochet"])
                .status()
                .context("cannot run cargo build")?;
            if !status.success() {
                bail!("the release build failed (see above)");
            }
            root.join("target/release/ricochet")
        }
    };
    let state = PathBuf::from(format!("/run/ricochet/xtask-run-{}.json", r.iface));
    let mut serve = vec![
        "serve".to_string(),
        "--mode".into(),
        r.mode.clone(),
        "--listen".into(),
        format!("udp://{address}:7777"),
        "--listen".into(),
        format!("sockperf+udp://{address}:11111"),
        "--listen".into(),
        format!("tcp://{address}:7777"),
    ];
    if !r
        .serve_args
        .iter()
        .any(|a| a == "--http" || a.starts_with("--http="))
    {
        serve.extend(["--http".into(), "127.0.0.1:9100".into()]);
    }
    if r.mode != "kernel" {
        serve.extend(["--iface".into(), r.iface.clone()]);
    }
    if let Some(profile) = &r.profile {
        serve.extend(["--profile".into(), profile.display().to_string()]);
    }
    serve.extend(r.serve_args.iter().cloned());
    println!(
        "interface {} (driver {driver}, {address}); mode {}",
        r.iface, r.mode
    );
    println!("running: {} {}", binary.display(), serve.join(" "));
    if r.dry_run {
        return Ok(());
    }
    if let Some(profile) = &r.profile {
        let status = Command::new(&binary)
            .args(["hw", "apply"])
            .arg(profile)
            .arg("--state")
            .arg(&state)
            .status()
            .context("cannot run ricochet hw apply")?;
        if !status.success() {
            bail!("the profile could not be applied (see above); nothing was started");
        }
    }
    let mut child = Command::new(&binary)
        .args(&serve)
        .spawn()
        .context("cannot start ricochet")?;
    // Ctrl-C reaches ricochet (same process group) and stops it cleanly; xtask ignores it so that it
    // can restore the profile afterwards. Set only now: a child spawned earlier would inherit it.
    // SAFETY: installing SIG_IGN for SIGINT has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = child.wait().context("waiting for ricochet")?;
    if r.profile.is_some() {
        let reverted = Command::new(&binary)
            .args(["hw", "revert", "--state"])
            .arg(&state)
            .status();
        if !reverted.map(|s| s.success()).unwrap_or(false) {
            eprintln!(
                "xtask: could not revert the profile: run 'sudo {} hw revert --state {}'",
                binary.display(),
                state.display()
            );
        }
    }
    if !status.success() {
        bail!("ricochet serve exited with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn arguments() {
        let r = parse(&args("--iface eth0 --mode xdp -- --poll spin")).unwrap();
        assert_eq!((r.iface.as_str(), r.mode.as_str()), ("eth0", "xdp"));
        assert_eq!(r.serve_args, args("--poll spin"));
        assert_eq!(parse(&args("--iface eth0")).unwrap().mode, "afxdp");
        assert!(parse(&args("--mode xdp"))
            .unwrap_err()
            .to_string()
            .contains("--iface is required"));
        assert!(parse(&args("--iface eth0 --mode dpdk"))
            .unwrap_err()
            .to_string()
            .contains("afxdp, xdp or kernel"));
        assert!(parse(&args("--iface"))
            .unwrap_err()
            .to_string()
            .contains("needs a value"));
    }
}
