//! `cargo xtask run --iface IF [--mode afxdp|xdp|kernel] [--profile FILE] [-- SERVE ARGS]`: check the
//! prerequisites, build, apply the profile, run `ricochet serve` on the interface with listeners on its
//! address and the HTTP endpoints on loopback; Ctrl-C stops it. The profile is reverted however
//! ricochet ends: stopped, exited on its own, or unable to start.
// The one module of xtask allowed unsafe code (main.rs denies it): signals and kill(2).
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

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
    let (driver, address) = check_prerequisites(&r)?;
    let binary = match &r.binary {
        Some(b) => b.clone(),
        None => build_release()?,
    };
    let serve = serve_args(&r, &address, own_mount_namespace());
    println!(
        "interface {} (driver {driver}, {address}); mode {}",
        r.iface, r.mode
    );
    println!("running: {} {}", binary.display(), serve.join(" "));
    if r.dry_run {
        return Ok(());
    }
    launch(&Launch {
        hw: binary.clone(),
        serve_program: binary,
        serve,
        profile: r.profile.clone(),
        state: PathBuf::from(format!("/run/ricochet/xtask-run-{}.json", r.iface)),
    })
}

/// Root, the tools, the interface, the kernel version the mode needs; returns the interface's driver
/// and first IPv4 address.
fn check_prerequisites(r: &RunArgs) -> Result<(String, String)> {
    if !is_root() {
        bail!(
            "xdp and af_xdp need root: run 'sudo cargo xtask run --iface {}' (or as root)",
            r.iface
        );
    }
    ensure_tools(&crate::packages::group("run"))?;
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
    Ok((driver, ipv4_of(&r.iface)?))
}

fn build_release() -> Result<PathBuf> {
    let root = workspace_root();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--release", "--quiet", "-p", "ricochet"])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("the release build failed (see above)");
    }
    Ok(root.join("target/release/ricochet"))
}

/// Whether this process runs in a mount namespace other than init's (as `ip netns exec` makes).
fn own_mount_namespace() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    ns("self") != ns("1")
}

/// Where `run` keeps the counter unless the caller gives `--state-dir`.
const STATE_DIR: &str = "/var/lib/ricochet/xtask-run";

/// `ricochet serve` arguments: listeners on the interface's address, HTTP on loopback and the state
/// directory unless the caller chose, the interface for the bypass modes, the profile, then the
/// caller's arguments.
fn serve_args(r: &RunArgs, address: &str, own_mount_namespace: bool) -> Vec<String> {
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
    let given = |flag: &str| {
        let with_value = format!("{flag}=");
        r.serve_args
            .iter()
            .any(|a| a == flag || a.starts_with(&with_value))
    };
    if !given("--http") {
        serve.extend(["--http".into(), "127.0.0.1:9100".into()]);
    }
    // The counter survives restarts and crashes, as under the systemd unit; but xdp mode's pin
    // cannot outlive a private mount namespace (`ip netns exec`), where serve would refuse.
    let pin_would_die = r.mode == "xdp" && own_mount_namespace;
    if !given("--state-dir") && !pin_would_die {
        serve.extend(["--state-dir".into(), STATE_DIR.into()]);
    }
    if r.mode != "kernel" {
        serve.extend(["--iface".into(), r.iface.clone()]);
    }
    if let Some(profile) = &r.profile {
        serve.extend(["--profile".into(), profile.display().to_string()]);
    }
    serve.extend(r.serve_args.iter().cloned());
    serve
}

/// What `launch` runs: `HW hw apply PROFILE --state STATE`, then `SERVE_PROGRAM SERVE...`, then
/// `HW hw revert --state STATE`. The two programs are the same ricochet binary except in tests.
struct Launch {
    hw: PathBuf,
    serve_program: PathBuf,
    serve: Vec<String>,
    profile: Option<PathBuf>,
    state: PathBuf,
}

/// Applies the profile, runs ricochet until it exits, and reverts the profile on every way out: a
/// serve that cannot be spawned or exits at once, Ctrl-C, and SIGTERM or SIGHUP sent to xtask at any
/// time, also while the profile is being applied (see [`AppliedProfile`] and [`StopSignals`]).
fn launch(l: &Launch) -> Result<()> {
    let signals = StopSignals::install();
    let profile = match &l.profile {
        Some(profile) => Some(AppliedProfile::apply(&l.hw, profile, &l.state)?),
        None => None,
    };
    if let Some(signal) = signals.received() {
        bail!("stopped by signal {signal} before ricochet started; the profile was reverted");
    }
    let mut serve = Command::new(&l.serve_program);
    let status = run_child(serve.args(&l.serve))
        .with_context(|| format!("cannot start {}", l.serve_program.display()))?;
    // Revert while the signals are still caught, so a second one cannot interrupt the revert.
    drop(profile);
    if let Some(signal) = signals.received().filter(|&s| s != libc::SIGINT) {
        bail!("stopped by signal {signal}; ricochet exited with {status} and the profile was reverted");
    }
    if !status.success() {
        bail!("ricochet serve exited with {status}");
    }
    Ok(())
}

/// Runs a child to completion; a stop signal xtask catches meanwhile is passed on to it.
fn run_child(command: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    let mut child = command.spawn()?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    // A signal that came before the child's pid was known is passed on now.
    let early = STOP_SIGNAL.load(Ordering::SeqCst);
    if early != 0 {
        // SAFETY: kill takes no pointers; the pid is our own child's, not yet reaped.
        unsafe { libc::kill(child.id() as i32, early) };
    }
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    status
}

/// A profile applied with `ricochet hw apply`. Dropping it runs `ricochet hw revert`, so the machine
/// is restored however `launch` ends. `hw apply` saves each change as it makes it, so a guard also
/// undoes what an apply that failed half way had already changed.
struct AppliedProfile {
    binary: PathBuf,
    state: PathBuf,
}

impl AppliedProfile {
    fn apply(binary: &Path, profile: &Path, state: &Path) -> Result<AppliedProfile> {
        if state.exists() {
            bail!(
                "a profile is still applied ({} exists: another 'cargo xtask run' on this interface, or one \
                 that was killed): run 'sudo {} hw revert --state {}' first",
                state.display(),
                binary.display(),
                state.display()
            );
        }
        let status = run_child(
            Command::new(binary)
                .args(["hw", "apply"])
                .arg(profile)
                .arg("--state")
                .arg(state),
        )
        .with_context(|| format!("cannot run {} hw apply", binary.display()))?;
        let applied = AppliedProfile {
            binary: binary.to_path_buf(),
            state: state.to_path_buf(),
        };
        if !status.success() {
            drop(applied);
            bail!("the profile could not be applied (see above); nothing was started");
        }
        Ok(applied)
    }
}

impl Drop for AppliedProfile {
    fn drop(&mut self) {
        if !self.state.exists() {
            // `hw apply` failed before it changed anything: there is nothing to revert.
            return;
        }
        let reverted = Command::new(&self.binary)
            .args(["hw", "revert", "--state"])
            .arg(&self.state)
            .status();
        if !reverted.is_ok_and(|s| s.success()) {
            eprintln!(
                "xtask: could not revert the profile: run 'sudo {} hw revert --state {}'",
                self.binary.display(),
                self.state.display()
            );
        }
    }
}

/// The stop signal xtask caught (0: none yet), and the child it passes signals on to (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static CHILD: AtomicI32 = AtomicI32::new(0);

/// The signals that stop a run: each is caught, recorded and passed on to the running child.
const STOPPING: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_stop_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe and takes no pointers.
        unsafe { libc::kill(child, signal) };
    }
}

/// SIGINT, SIGTERM and SIGHUP caught (recorded and passed on to the child, see [`run_child`]) until
/// dropped, then their previous dispositions restored. Caught, not ignored: exec resets a caught
/// signal to its default, so `hw apply` and `serve` keep their usual behaviour, while xtask lives on
/// to revert the profile.
struct StopSignals([libc::sigaction; STOPPING.len()]);

impl StopSignals {
    fn install() -> StopSignals {
        STOP_SIGNAL.store(0, Ordering::SeqCst);
        // SAFETY: sigaction is a plain C struct; all-zero is a valid value (empty mask, no flags).
        let mut previous: [libc::sigaction; STOPPING.len()] = unsafe { std::mem::zeroed() };
        for (signal, old) in STOPPING.iter().zip(previous.iter_mut()) {
            // SAFETY: as above for the zeroed struct.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            // SAFETY: both pointers are valid sigaction structs on our stack; the handler only does
            // async-signal-safe work (atomic stores and loads, kill).
            unsafe { libc::sigaction(*signal, &action, old) };
        }
        StopSignals(previous)
    }

    /// The stop signal caught since `install`, if any.
    fn received(&self) -> Option<libc::c_int> {
        Some(STOP_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (signal, old) in STOPPING.iter().zip(self.0.iter()) {
            // SAFETY: restores the disposition sigaction returned in `install`.
            unsafe { libc::sigaction(*signal, old, std::ptr::null_mut()) };
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn serve_gets_a_state_directory_unless_the_caller_gives_one() {
        let line = |a: &str, own_ns: bool| {
            serve_args(&parse(&args(a)).unwrap(), "192.0.2.1", own_ns).join(" ")
        };
        let serve = line("--iface eth0", true);
        assert!(
            serve.contains(&format!("--state-dir {STATE_DIR}")),
            "{serve}"
        );
        let serve = line("--iface eth0 -- --state-dir=/tmp/x", false);
        assert!(
            !serve.contains(STATE_DIR) && serve.ends_with("--state-dir=/tmp/x"),
            "{serve}"
        );
        // xdp under ip netns exec: no default, the pin would die with the namespace.
        assert!(line("--iface eth0 --mode xdp", false).contains(STATE_DIR));
        assert!(!line("--iface eth0 --mode xdp", true).contains(STATE_DIR));
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

    /// A directory with a stand-in for ricochet that logs each call to `log` and behaves as told:
    /// `hw apply` writes the state file unless `apply_saves` is false and exits `apply_exit`;
    /// `hw revert` removes the state file; `serve` exits 3 at once. Removed on drop.
    struct FakeRicochet {
        dir: PathBuf,
    }

    impl FakeRicochet {
        fn new(name: &str, apply_saves: bool, apply_exit: u8) -> FakeRicochet {
            FakeRicochet::with_serve(name, apply_saves, apply_exit, "exit 3")
        }

        /// As `new`, with `serve` running the shell line `serve`.
        fn with_serve(name: &str, apply_saves: bool, apply_exit: u8, serve: &str) -> FakeRicochet {
            let dir = std::env::temp_dir().join(format!("xtask-run-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let save = if apply_saves {
                "echo '{}' > \"$state\""
            } else {
                ":"
            };
            let script = format!(
                "#!/bin/sh\n\
                 echo \"$1 $2\" >> '{log}'\n\
                 state=; prev=; for a in \"$@\"; do [ \"$prev\" = --state ] && state=$a; prev=$a; done\n\
                 case \"$1 $2\" in\n\
                 'hw apply') {save}; exit {apply_exit};;\n\
                 'hw revert') rm \"$state\"; exit 0;;\n\
                 esac\n\
                 {serve}\n",
                log = dir.join("log").display()
            );
            let program = dir.join("ricochet");
            std::fs::write(&program, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
            FakeRicochet { dir }
        }

        fn launch(&self, serve_program: &Path) -> Launch {
            Launch {
                hw: self.dir.join("ricochet"),
                serve_program: serve_program.to_path_buf(),
                serve: args("serve --mode xdp"),
                profile: Some(self.dir.join("profile.toml")),
                state: self.dir.join("state.json"),
            }
        }

        /// The calls made so far, one "ARG1 ARG2" per call.
        fn calls(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.join("log"))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    impl Drop for FakeRicochet {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// `launch` installs process-wide signal handlers: its tests run one at a time.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static LAUNCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());
        LAUNCHES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[test]
    fn sigterm_to_xtask_stops_serve_and_reverts_the_profile() {
        let fake = FakeRicochet::with_serve("term", true, 0, "exec sleep 30");
        let _serial = serial();
        let l = fake.launch(&fake.dir.join("ricochet"));
        let killer = std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(500));
            // SAFETY: kill takes no pointers; the signal goes to this test process, whose handler
            // `launch` installed (it runs for 30 s unless the signal stops it).
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        });
        let started = std::time::Instant::now();
        let error = launch(&l).unwrap_err();
        killer.join().unwrap();
        assert!(
            format!("{error:#}").contains("stopped by signal 15"),
            "{error:#}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "serve was stopped"
        );
        assert_eq!(fake.calls(), ["hw apply", "serve --mode", "hw revert"]);
        assert!(!l.state.exists());
    }

    #[test]
    fn a_serve_that_cannot_be_spawned_reverts_the_profile() {
        let fake = FakeRicochet::new("spawn", true, 0);
        let _serial = serial();
        let l = fake.launch(&fake.dir.join("no-such-ricochet"));
        let error = launch(&l).unwrap_err();
        assert!(format!("{error:#}").contains("cannot start"), "{error:#}");
        assert_eq!(fake.calls(), ["hw apply", "hw revert"]);
        assert!(!l.state.exists(), "the state file is gone after the revert");
    }

    #[test]
    fn a_serve_that_exits_at_once_reverts_the_profile() {
        let fake = FakeRicochet::new("exit", true, 0);
        let _serial = serial();
        let l = fake.launch(&fake.dir.join("ricochet"));
        let error = launch(&l).unwrap_err();
        assert!(format!("{error:#}").contains("exited with"), "{error:#}");
        assert_eq!(fake.calls(), ["hw apply", "serve --mode", "hw revert"]);
        assert!(!l.state.exists());
    }

    #[test]
    fn an_apply_that_fails_half_way_is_reverted_and_nothing_starts() {
        let fake = FakeRicochet::new("partial", true, 1);
        let _serial = serial();
        let l = fake.launch(&fake.dir.join("ricochet"));
        let error = launch(&l).unwrap_err();
        assert!(
            format!("{error:#}").contains("could not be applied"),
            "{error:#}"
        );
        assert_eq!(fake.calls(), ["hw apply", "hw revert"]);
        assert!(!l.state.exists());
    }

    #[test]
    fn an_apply_that_changed_nothing_is_not_reverted() {
        let fake = FakeRicochet::new("nothing", false, 1);
        let _serial = serial();
        let l = fake.launch(&fake.dir.join("ricochet"));
        assert!(launch(&l).is_err());
        assert_eq!(fake.calls(), ["hw apply"]);
    }

    #[test]
    fn a_profile_still_applied_is_neither_applied_again_nor_reverted() {
        let fake = FakeRicochet::new("leftover", true, 0);
        let _serial = serial();
        let l = fake.launch(&fake.dir.join("ricochet"));
        std::fs::write(&l.state, "{}").unwrap();
        let error = launch(&l).unwrap_err();
        assert!(
            format!("{error:#}").contains("hw revert --state"),
            "{error:#}"
        );
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
        assert!(l.state.exists(), "another run's state is left alone");
    }
}
