//! Least privilege after set-up. Capabilities, `no_new_privs` and user IDs belong to each thread,
//! not to the process, so every thread that exists during set-up leaves root on its own: packet
//! workers once their sockets are open ([`Lockdown::enter`]), the main thread last
//! ([`Lockdown::finish`]), which then checks every thread of the process in `/proc/self/task` and
//! fails start-up if one still holds more. Threads started afterwards inherit the main thread's
//! credentials.
//!
//! What is kept: nothing, except `CAP_IPC_LOCK` with `--mlock` (memory locked with `MCL_FUTURE`
//! must stay lockable as the heap grows, and `ulimit -l` may be small). Everything else is needed
//! only to set up: loading and attaching XDP (`CAP_BPF`, `CAP_PERFMON`, `CAP_NET_ADMIN`, or
//! `CAP_SYS_ADMIN` on older kernels), AF_XDP sockets (`CAP_NET_RAW`), busy polling
//! (`CAP_NET_ADMIN`), UMEM beyond `ulimit -l` (`CAP_IPC_LOCK`), `SCHED_FIFO` (`CAP_SYS_NICE`),
//! ports below 1024 (`CAP_NET_BIND_SERVICE`). The XDP program's BPF link detaches when its
//! descriptor closes, which needs no capability.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use caps::{CapSet, Capability, CapsHashSet};

use crate::sys;

/// The user to become.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// What every thread keeps once set up, decided before any thread starts.
#[derive(Debug, Clone)]
pub struct Lockdown {
    keep: CapsHashSet,
    account: Option<Account>,
    /// Whether the bounding set can be emptied (it needs `CAP_SETPCAP`).
    bounding: bool,
}

/// The outcome, for the log and `/stats`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    pub kept: Vec<String>,
    /// The user `--user` switched to, if any.
    pub user: Option<Account>,
    /// Who the process runs as now.
    pub uid: u32,
    pub gid: u32,
    pub no_new_privs: bool,
    /// Whether the bounding set was emptied too (it takes `CAP_SETPCAP`, which a process started
    /// without it cannot do).
    pub bounding_emptied: bool,
    pub threads: usize,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = if self.kept.is_empty() {
            "no capability".to_string()
        } else {
            self.kept.join(", ")
        };
        write!(
            f,
            "privileges dropped in {} threads: kept {kept}",
            self.threads
        )?;
        match &self.user {
            Some(user) => write!(
                f,
                "; switched to {} (uid {}, gid {})",
                user.name, user.uid, user.gid
            )?,
            None => write!(f, "; running as uid {}, gid {}", self.uid, self.gid)?,
        }
        if !self.bounding_emptied {
            f.write_str("; bounding set left as it was (no CAP_SETPCAP)")?;
        }
        f.write_str("; no_new_privs set")
    }
}

impl Lockdown {
    /// Plans the drop: keep `CAP_IPC_LOCK` when memory is locked (if this process has it), become
    /// `user` if given (which needs root's `CAP_SETUID` and `CAP_SETGID`).
    pub fn plan(user: Option<&str>, mlock: bool) -> Result<Lockdown> {
        let permitted = caps::read(None, CapSet::Permitted).context("cannot read capabilities")?;
        let mut keep = CapsHashSet::new();
        if mlock && permitted.contains(&Capability::CAP_IPC_LOCK) {
            keep.insert(Capability::CAP_IPC_LOCK);
        }
        let account = user.map(|name| account(name, &permitted)).transpose()?;
        let bounding = permitted.contains(&Capability::CAP_SETPCAP);
        Ok(Lockdown {
            keep,
            account,
            bounding,
        })
    }

    /// Drops the calling thread's privileges: the bounding and ambient sets, the user and group
    /// (with `--user`), then the permitted, effective and inheritable sets; sets `no_new_privs`.
    pub fn enter(&self) -> Result<()> {
        if self.bounding {
            for cap in caps::read(None, CapSet::Bounding)? {
                if !self.keep.contains(&cap) {
                    caps::drop(None, CapSet::Bounding, cap)
                        .with_context(|| format!("cannot drop {cap} from the bounding set"))?;
                }
            }
        }
        caps::clear(None, CapSet::Ambient).context("cannot clear the ambient capabilities")?;
        if let Some(user) = &self.account {
            // Keep the permitted set across the user switch; it is cut to `keep` just below.
            nix::sys::prctl::set_keepcaps(true)?;
            sys::set_thread_ids(user.uid, user.gid)
                .with_context(|| format!("cannot switch to user {}", user.name))?;
            nix::sys::prctl::set_keepcaps(false)?;
        }
        // The effective set shrinks first: it must stay within the permitted set.
        let none = CapsHashSet::new();
        let sets = [
            (CapSet::Effective, &self.keep),
            (CapSet::Inheritable, &none),
            (CapSet::Permitted, &self.keep),
        ];
        for (set, value) in sets {
            caps::set(None, set, value)
                .with_context(|| format!("cannot set the {set:?} capabilities"))?;
        }
        nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")
    }

    /// The user and group `--user` switches to.
    pub fn user_ids(&self) -> Option<(u32, u32)> {
        self.account.as_ref().map(|a| (a.uid, a.gid))
    }

    /// With `--user`, gives the files set-up created (Unix socket files) to that user, so that it can
    /// remove them at exit. A symbolic link is changed itself, never what it points to.
    pub fn hand_over<'p>(&self, files: impl IntoIterator<Item = &'p Path>) -> Result<()> {
        let Some(user) = &self.account else {
            return Ok(());
        };
        for file in files {
            std::os::unix::fs::lchown(file, Some(user.uid), Some(user.gid))
                .with_context(|| format!("cannot give {} to user {}", file.display(), user.name))?;
        }
        Ok(())
    }

    /// Drops the main thread's privileges once every other thread of set-up has, then checks every
    /// thread of the process.
    pub fn finish(&self) -> Result<Dropped> {
        self.enter()?;
        let threads = self.verify()?;
        let mut kept: Vec<String> = self.keep.iter().map(|c| c.to_string()).collect();
        kept.sort();
        Ok(Dropped {
            kept,
            user: self.account.clone(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            no_new_privs: true,
            bounding_emptied: self.bounding,
            threads,
        })
    }

    /// Reads `/proc/self/task/*/status`: every thread must hold exactly the kept capabilities, have
    /// `no_new_privs` and run as the planned user.
    fn verify(&self) -> Result<usize> {
        let keep = mask(&self.keep);
        let mut threads = 0;
        for entry in std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
            let dir = entry?.path();
            let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
                continue; // the thread ended
            };
            let creds = ThreadCreds::parse(&status)
                .ok_or_else(|| anyhow!("cannot parse {}", dir.join("status").display()))?;
            let ids = self.account.as_ref().map(|a| (a.uid, a.gid));
            if let Some(what) = creds.excess(keep, self.bounding, ids) {
                bail!(
                    "thread {} ({}) {what} after the privilege drop",
                    creds.name,
                    dir.display()
                );
            }
            threads += 1;
        }
        Ok(threads)
    }
}

/// After the drop, the bypass datapaths still read the XDP program's statistics map through its
/// descriptor, and they rely on the program's BPF link detaching it when the descriptor closes at
/// exit. Linux before 5.9 has no XDP links (detaching would need `CAP_NET_ADMIN`), and before 5.19
/// refuses every `bpf()` call from a process without `CAP_BPF` while
/// `kernel.unprivileged_bpf_disabled` is set. The responder of xdp mode (`responder`) also needs
/// 5.18 for TCP-lite's helpers (`bpf_xdp_load_bytes`, `bpf_xdp_store_bytes`, `bpf_loop`). Refuse
/// such a kernel at start-up, not at the first read or in the verifier.
pub fn check_bypass_kernel(responder: bool) -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("cannot read /proc/sys/kernel/osrelease")?;
    let version = kernel_version(&release)
        .ok_or_else(|| anyhow!("cannot parse the kernel release '{}'", release.trim()))?;
    let release = release.trim();
    if version < (5, 9) {
        bail!("Linux {release} has no XDP links: the bypass modes need 5.9 or later");
    }
    if responder && version < (5, 18) {
        bail!("Linux {release} lacks the BPF helpers xdp mode's program uses (TCP-lite): xdp mode needs 5.18 or later; use --mode afxdp or kernel");
    }
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled");
    let disabled = disabled.is_ok_and(|v| v.trim() != "0");
    if version < (5, 19) && disabled {
        bail!("Linux {release} refuses BPF map reads from a process without CAP_BPF while kernel.unprivileged_bpf_disabled is set, and ricochet drops CAP_BPF once set up: the bypass modes need 5.19 or later here");
    }
    Ok(())
}

fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn account(name: &str, permitted: &CapsHashSet) -> Result<Account> {
    let user = nix::unistd::User::from_name(name)
        .with_context(|| format!("cannot look up user '{name}'"))?
        .ok_or_else(|| {
            anyhow!("--user {name}: no such user (create it, or pick one from /etc/passwd)")
        })?;
    for cap in [Capability::CAP_SETUID, Capability::CAP_SETGID] {
        if !permitted.contains(&cap) {
            bail!("--user {name} needs root (or {cap}) to switch users; start ricochet as root or drop --user");
        }
    }
    Ok(Account {
        name: name.to_string(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

fn ids(value: &str) -> Vec<u32> {
    value
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |m, cap| m | cap.bitmask())
}

/// One thread's credentials as `/proc/PID/task/TID/status` shows them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ThreadCreds {
    pub name: String,
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

impl ThreadCreds {
    pub fn parse(status: &str) -> Option<ThreadCreds> {
        let mut c = ThreadCreds::default();
        let mut seen = BTreeSet::new();
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let hex = || u64::from_str_radix(value, 16).ok();
            match key {
                "Name" => c.name = value.to_string(),
                "Uid" => c.uids = ids(value).try_into().ok()?,
                "Gid" => c.gids = ids(value).try_into().ok()?,
                "Groups" => c.groups = ids(value),
                "CapInh" => c.inheritable = hex()?,
                "CapPrm" => c.permitted = hex()?,
                "CapEff" => c.effective = hex()?,
                "CapBnd" => c.bounding = hex()?,
                "CapAmb" => c.ambient = hex()?,
                "NoNewPrivs" => c.no_new_privs = value == "1",
                _ => continue,
            }
            seen.insert(key);
        }
        (seen.len() == 10).then_some(c)
    }

    /// What this thread holds beyond `keep` (or lacks), if anything; `ids` is the user and group it
    /// must run as (and its only group).
    fn excess(&self, keep: u64, bounding: bool, ids: Option<(u32, u32)>) -> Option<String> {
        let sets = [
            ("CapPrm", self.permitted),
            ("CapEff", self.effective),
            ("CapInh", self.inheritable),
            ("CapAmb", self.ambient),
        ];
        for (name, value) in sets {
            if value & !keep != 0 {
                return Some(format!("still has {name} {value:016x}"));
            }
        }
        if bounding && self.bounding & !keep != 0 {
            return Some(format!("still has CapBnd {:016x}", self.bounding));
        }
        if !self.no_new_privs {
            return Some("has no no_new_privs".into());
        }
        let (uid, gid) = ids?;
        if self.uids.iter().any(|&u| u != uid) {
            return Some(format!("runs as uids {:?}, not {uid}", self.uids));
        }
        if self.gids.iter().any(|&g| g != gid) || self.groups.iter().any(|&g| g != gid) {
            return Some(format!(
                "runs as gids {:?} groups {:?}, not {gid}",
                self.gids, self.groups
            ));
        }
        None
    }
}

#[cfg(test)]
mod test {
    use super::*;

    const STATUS: &str = "Name:\tkernel-0\nUmask:\t0022\nUid:\t65534\t65534\t65534\t65534\n\
        Gid:\t65534\t65534\t65534\t65534\nGroups:\t65534 \n\
        NoNewPrivs:\t1\nCapInh:\t0000000000000000\nCapPrm:\t0000000000004000\n\
        CapEff:\t0000000000004000\nCapBnd:\t0000000000004000\nCapAmb:\t0000000000000000\n";

    #[test]
    fn a_locked_down_thread_passes_and_each_excess_is_named() {
        let c = ThreadCreds::parse(STATUS).unwrap();
        assert_eq!(c.name, "kernel-0");
        let ipc_lock = Capability::CAP_IPC_LOCK.bitmask();
        assert_eq!(c.permitted, ipc_lock);
        assert_eq!(c.excess(ipc_lock, true, Some((65534, 65534))), None);
        let e = c.excess(0, true, Some((65534, 65534))).unwrap();
        assert!(e.contains("CapPrm"), "{e}");
        let e = c.excess(ipc_lock, true, Some((0, 65534))).unwrap();
        assert!(e.contains("uids"), "{e}");
        let e = c.excess(ipc_lock, true, Some((65534, 0))).unwrap();
        assert!(e.contains("gids"), "{e}");
        let open = ThreadCreds {
            no_new_privs: false,
            ..ThreadCreds::parse(STATUS).unwrap()
        };
        assert!(open
            .excess(ipc_lock, true, None)
            .unwrap()
            .contains("no_new_privs"));
    }

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(kernel_version("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("5.4-rc1"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
        assert!((5, 15) < (5, 19) && (6, 1) > (5, 19));
    }

    #[test]
    fn a_status_missing_a_field_is_not_parsed() {
        let cut = STATUS.replace("NoNewPrivs:\t1\n", "");
        assert_eq!(ThreadCreds::parse(&cut), None);
    }
}
