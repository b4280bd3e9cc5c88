//! `cargo xtask package [--check]`: the Debian package (cargo-deb, metadata in
//! `userspace/Cargo.toml`) and, with `--check` as root, an install on this machine with `dpkg -i`:
//! the binary runs from `/usr/bin`, the unit passes `systemd-analyze verify`, the shipped
//! configuration loads; then the package is purged, whatever failed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{ensure_tools, is_root, packages, run, workspace_root};

/// What the package must install.
const FILES: [&str; 6] = [
    "/usr/bin/ricochet",
    "/usr/lib/systemd/system/ricochet.service",
    "/etc/ricochet/ricochet.toml",
    "/usr/share/ricochet/hw-profiles/intel-e810-ice.toml",
    "/usr/share/ricochet/hw-profiles/README.md",
    "/usr/share/doc/ricochet/README.md",
];

pub fn run_command(args: &[String]) -> Result<()> {
    let check = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => false,
        ["--check"] => true,
        _ => bail!("usage: cargo xtask package [--check]"),
    };
    if check && !is_root() {
        bail!("package --check installs the package with dpkg: run it as root");
    }
    ensure_tools(&packages::group("package"))?;
    let deb = build()?;
    println!("{}", deb.display());
    if check {
        check_install(&deb)?;
        println!(
            "package check passed: installed, ran, verified and purged {}",
            deb.display()
        );
    }
    Ok(())
}

/// Builds the release binary and the package; returns the .deb's path.
fn build() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_cargo_deb = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_deb {
        eprintln!("xtask: installing cargo-deb (cargo install cargo-deb --locked)");
        run(Command::new(&cargo).args(["install", "cargo-deb", "--locked"]))
            .context("cannot install cargo-deb")?;
    }
    let out = Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["deb", "-p", "ricochet"])
        .output()
        .context("cannot run cargo deb")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "cargo deb failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = stdout.lines().rev().find(|l| l.ends_with(".deb"));
    Ok(PathBuf::from(
        path.context("cargo deb named no .deb")?.trim(),
    ))
}

/// Installs, checks, and purges the package (the purge also runs when a check fails).
fn check_install(deb: &Path) -> Result<()> {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "ricochet"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "install ok installed");
    if installed {
        bail!(
            "a ricochet package is already installed here: remove it first (dpkg --purge ricochet)"
        );
    }
    // Whatever happens from here, the package is purged: a failed dpkg -i may leave it half there.
    let checked = run(Command::new("dpkg").arg("-i").arg(deb))
        .context("dpkg -i failed")
        .and_then(|()| check_installed(deb));
    run(Command::new("dpkg").args(["--purge", "ricochet"])).context("dpkg --purge failed")?;
    checked?;
    for file in ["/usr/bin/ricochet", "/etc/ricochet/ricochet.toml"] {
        if Path::new(file).exists() {
            bail!("{file} is still there after dpkg --purge");
        }
    }
    Ok(())
}

fn check_installed(deb: &Path) -> Result<()> {
    for file in FILES {
        if !Path::new(file).exists() {
            bail!("the package did not install {file}");
        }
    }
    // The package version is the crate's, plus the Debian revision.
    let package = output(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"))?;
    let upstream = package
        .trim()
        .rsplit_once('-')
        .map_or(package.trim(), |(v, _)| v);
    let version = output(Command::new("/usr/bin/ricochet").arg("--version"))?;
    println!("/usr/bin/ricochet --version: {}", version.trim());
    if version.trim() != format!("ricochet {upstream}") {
        bail!(
            "/usr/bin/ricochet --version printed '{}', expected 'ricochet {upstream}'",
            version.trim()
        );
    }
    let unit = "/usr/lib/systemd/system/ricochet.service";
    let verify = Command::new("systemd-analyze")
        .args(["verify", unit])
        .output()?;
    let warnings = String::from_utf8_lossy(&verify.stderr);
    if !verify.status.success() || !warnings.trim().is_empty() {
        bail!("systemd-analyze verify {unit}:\n{warnings}");
    }
    output(Command::new("/usr/bin/ricochet").args([
        "serve",
        "--config",
        "/etc/ricochet/ricochet.toml",
        "--print-config",
    ]))
    .context("the installed configuration does not load")?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
