//! The counter that survives (`serve --state-dir DIR`).
//!
//! Two records, for two kinds of crash:
//! - **The live counter** is kept where a dead process cannot take it along. In the kernel and afxdp
//!   modes it is the first eight bytes of `DIR/counter.live`, a shared file mapping, so every add
//!   lands in the page cache at once. In xdp mode it is the XDP program's counter map, pinned in
//!   bpffs. After SIGKILL, a panic or the OOM killer, the next start reads it back exactly.
//! - **Snapshots** survive a machine crash. Every `--sync-interval` a thread writes the value to
//!   `DIR/counter.snap` and fsyncs it. There are two slots, 4 KiB apart, written in turn; each holds
//!   a sequence number and an xxh64 checksum, so a torn write spoils one slot and the other still
//!   holds the previous value. SIGTERM ends with a final snapshot marked clean.
//!
//! At start-up the counter resumes from the larger of the live value and the newest valid
//! snapshot. Values are compared as integers, so a counter that wraps past 2^64 is not supported.
//! `DIR/lock` (flock) keeps two instances off one directory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

const MAGIC: &[u8; 8] = b"RICOSNAP";
const VERSION: u32 = 1;

/// Where the two snapshot slots start: a page (at least 4 KiB) apart, so one write cannot tear both.
fn slots() -> [u64; 2] {
    [0, page_size().max(4096)]
}

/// One snapshot of the counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// Increases with every snapshot; the newer slot has the larger one.
    pub seq: u64,
    pub value: u64,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Written by an orderly stop (SIGTERM) after the last request.
    pub clean: bool,
}

impl Snapshot {
    pub const LEN: usize = 48;

    /// magic (8) | version (4) | clean (4) | seq (8) | value (8) | unix_ms (8) | xxh64 of the rest (8),
    /// little-endian.
    pub fn encode(&self) -> [u8; Snapshot::LEN] {
        let mut b = [0u8; Snapshot::LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(self.clean).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.value.to_le_bytes());
        b[32..40].copy_from_slice(&self.unix_ms.to_le_bytes());
        let sum = xxhash_rust::xxh64::xxh64(&b[..40], 0);
        b[40..48].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The snapshot in `bytes`, or None if the slot is empty, torn or from another format.
    pub fn decode(bytes: &[u8]) -> Option<Snapshot> {
        let b: &[u8; Snapshot::LEN] = bytes.get(..Snapshot::LEN)?.try_into().ok()?;
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let ok = &b[0..8] == MAGIC
            && b[8..12] == VERSION.to_le_bytes()
            && word(40) == xxhash_rust::xxh64::xxh64(&b[..40], 0);
        let clean = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        (ok && clean <= 1).then(|| Snapshot {
            seq: word(16),
            value: word(24),
            unix_ms: word(32),
            clean: clean == 1,
        })
    }

    /// The newer of the valid snapshots among the slots.
    pub fn newest(slots: &[Option<Snapshot>]) -> Option<Snapshot> {
        slots.iter().flatten().copied().max_by_key(|s| s.seq)
    }
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    since.map_or(0, |d| d.as_millis() as u64)
}

/// The state directory, locked for this process.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// Held (flock) for the life of the process; the kernel releases it if the process dies.
    lock: nix::fcntl::Flock<File>,
    snapshots: File,
}

/// What the snapshot file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotRead {
    pub newest: Option<Snapshot>,
    /// The file has bytes but no whole slot: its last value is unknown.
    pub damaged: bool,
}

impl StateDir {
    /// Creates (mode 0700) and locks `path`; refuses a directory another instance holds.
    pub fn open(path: &Path) -> Result<StateDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("cannot create the state directory {}", path.display()))?;
        let path = path.canonicalize()?;
        let new_files = !path.join("counter.snap").exists();
        let lock = open_rw(&path.join("lock"))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .with_context(|| {
                format!("another ricochet holds the state directory {}: give each instance its own --state-dir", path.display())
            })?;
        let snapshots = open_rw(&path.join("counter.snap"))?;
        if new_files {
            // The new directory entries must survive a crash too, or the next start sees no state.
            sync_dir(&path)?;
            if let Some(parent) = path.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(StateDir {
            path,
            lock,
            snapshots,
        })
    }

    /// With `--user`: gives the directory and its open files to that user, through the descriptors
    /// (never following a link someone put in their place).
    pub fn hand_over(&self, uid: u32, gid: u32, live: Option<&File>) -> Result<()> {
        let (uid, gid) = (Some(uid), Some(gid));
        std::os::unix::fs::lchown(&self.path, uid, gid)
            .with_context(|| format!("cannot give {} to the user", self.path.display()))?;
        for file in [Some(&*self.lock), Some(&self.snapshots), live]
            .into_iter()
            .flatten()
        {
            std::os::unix::fs::fchown(file, uid, gid)
                .context("cannot give a state file to the user")?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest whole snapshot, and whether the file is damaged (bytes but no whole slot).
    pub fn read_snapshots(&self) -> Result<SnapshotRead> {
        let len = self.snapshots.metadata()?.len();
        let mut found = [None, None];
        for (slot, offset) in found.iter_mut().zip(slots()) {
            let mut buf = [0u8; Snapshot::LEN];
            if self.snapshots.read_exact_at(&mut buf, offset).is_ok() {
                *slot = Snapshot::decode(&buf);
            }
        }
        let newest = Snapshot::newest(&found);
        Ok(SnapshotRead {
            newest,
            damaged: newest.is_none() && len > 0,
        })
    }

    /// A writer continuing after `last`.
    pub fn writer(&self, last: Option<Snapshot>) -> Result<SnapshotWriter> {
        Ok(SnapshotWriter {
            file: self.snapshots.try_clone()?,
            seq: last.map_or(0, |s| s.seq),
        })
    }

    /// The live counter of the kernel and afxdp modes: the file and the value it held, if any.
    pub fn live_file(&self) -> Result<(File, Option<u64>)> {
        let path = self.path.join("counter.live");
        let file = open_rw(&path)?;
        let mut buf = [0u8; 8];
        let previous = match file.metadata()?.len() {
            0 => None,
            _ => {
                file.read_exact_at(&mut buf, 0)?;
                Some(u64::from_ne_bytes(buf))
            }
        };
        file.set_len(page_size())?;
        Ok((file, previous))
    }

    /// Where xdp mode pins its counter map in the bpffs at `bpffs` (see [`pin_path`]).
    pub fn pin_path(&self, bpffs: &Path) -> PathBuf {
        pin_path(bpffs, &self.path)
    }
}

/// Where xdp mode pins the counter map of the state directory `canonical` (an absolute path without
/// symbolic links) in the bpffs mounted at `bpffs`: one name per state directory.
pub fn pin_path(bpffs: &Path, canonical: &Path) -> PathBuf {
    let id = xxhash_rust::xxh64::xxh64(canonical.as_os_str().as_encoded_bytes(), 0);
    bpffs.join(format!("ricochet-{id:016x}-counter"))
}

/// Opens (or creates, mode 0600) a regular file, never through a symbolic link: with `--user` the
/// directory belongs to that user, and this runs as root at the next start.
fn open_rw(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| {
            format!(
                "cannot open {} (a symbolic link is refused)",
                path.display()
            )
        })?;
    if !file.metadata()?.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    Ok(file)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |n| n as u64)
}

/// Writes snapshots to alternate slots, each made durable before the next.
#[derive(Debug)]
pub struct SnapshotWriter {
    file: File,
    seq: u64,
}

impl SnapshotWriter {
    pub fn write(&mut self, value: u64, clean: bool) -> io::Result<Snapshot> {
        let snapshot = Snapshot {
            seq: self.seq + 1,
            value,
            unix_ms: now_ms(),
            clean,
        };
        let slot = slots()[(snapshot.seq % 2) as usize];
        self.file.write_all_at(&snapshot.encode(), slot)?;
        self.file.sync_data()?;
        self.seq = snapshot.seq;
        Ok(snapshot)
    }
}

/// How the previous run ended, as far as the state tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PreviousStop {
    /// No state: the counter starts at zero.
    FirstStart,
    /// A final snapshot matching the live value.
    Clean,
    /// A crash of the process or the machine: the counter was recovered.
    Unclean,
}

/// What start-up resumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    pub value: u64,
    pub previous: PreviousStop,
    /// The live record (file or pinned map) held the value; false when a snapshot did.
    pub from_live: bool,
    pub last_snapshot: Option<Snapshot>,
}

impl Recovery {
    /// The larger of the live value and the newest snapshot.
    pub fn decide(live: Option<u64>, snapshot: Option<Snapshot>) -> Recovery {
        let snap_value = snapshot.map(|s| s.value);
        let value = live.unwrap_or(0).max(snap_value.unwrap_or(0));
        let previous = match (live, snapshot) {
            (None, None) => PreviousStop::FirstStart,
            (Some(l), Some(s)) if s.clean && l == s.value => PreviousStop::Clean,
            // The live record went with a reboot (a bpffs pin) after a clean stop: still exact.
            (None, Some(s)) if s.clean => PreviousStop::Clean,
            _ => PreviousStop::Unclean,
        };
        Recovery {
            value,
            previous,
            from_live: live.is_some_and(|l| Some(l) >= snap_value),
            last_snapshot: snapshot,
        }
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let age = |s: &Snapshot| {
            let ms = now_ms().saturating_sub(s.unix_ms);
            format!(
                "{:.1} s before this start",
                Duration::from_millis(ms).as_secs_f64()
            )
        };
        match (self.previous, &self.last_snapshot) {
            (PreviousStop::FirstStart, _) => "counter state is new: starting at 0".into(),
            (PreviousStop::Clean, _) => {
                format!("counter resumes at {} after a clean stop", self.value)
            }
            (PreviousStop::Unclean, snapshot) => {
                format!(
                "counter recovered at {} after an unclean stop, from the {} (last snapshot: {})",
                self.value,
                if self.from_live { "live record" } else { "newest snapshot" },
                snapshot.as_ref().map_or("none".into(), age)
            )
            }
        }
    }
}

/// Whether `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// The default bpffs, mounted at start-up if nothing is mounted there.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Checks that `dir` is a bpffs; mounts one on the default place if nothing is mounted there. A pin
/// lives as long as its bpffs: in a private mount namespace (`ip netns exec` remounts /sys) it dies
/// with the process, so such setups pass a bpffs of the host (`--bpffs`).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    if is_bpffs(dir) {
        return Ok(());
    }
    let shown = dir.display();
    if dir != Path::new(DEFAULT_BPFFS) {
        bail!("--bpffs {shown}: not a bpffs (mount one: mount -t bpf bpf {shown})");
    }
    // A bpffs mounted in a private mount namespace (`ip netns exec` makes one) dies with the
    // process, and the pin with it: refuse rather than void the guarantee.
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    if ns("self") != ns("1") {
        bail!("{shown} is not a bpffs and this process has a mount namespace of its own (ip netns exec?): a bpffs mounted here would die with the process and the pinned counter with it; mount one in the host's namespace and pass it with --bpffs");
    }
    let flags = nix::mount::MsFlags::empty();
    nix::mount::mount(Some("bpf"), dir, Some("bpf"), flags, None::<&str>).with_context(|| {
        format!("cannot mount bpffs on {shown} (needs root; or mount it: mount -t bpf bpf {shown})")
    })
}

#[cfg(test)]
mod test {
    use super::*;

    fn snap(seq: u64, value: u64, clean: bool) -> Snapshot {
        Snapshot {
            seq,
            value,
            unix_ms: 1_700_000_000_000,
            clean,
        }
    }

    #[test]
    fn a_snapshot_round_trips_and_any_flipped_byte_spoils_it() {
        let s = snap(7, 123_456, true);
        let bytes = s.encode();
        assert_eq!(Snapshot::decode(&bytes), Some(s));
        for i in 0..Snapshot::LEN {
            let mut torn = bytes;
            torn[i] ^= 0x40;
            assert_eq!(Snapshot::decode(&torn), None, "byte {i}");
        }
        assert_eq!(Snapshot::decode(&[0u8; Snapshot::LEN]), None);
        assert_eq!(Snapshot::decode(&bytes[..20]), None);
    }

    #[test]
    fn the_newest_valid_slot_wins() {
        let (a, b) = (snap(4, 10, false), snap(5, 12, false));
        assert_eq!(Snapshot::newest(&[Some(a), Some(b)]), Some(b));
        assert_eq!(Snapshot::newest(&[Some(a), None]), Some(a));
        assert_eq!(Snapshot::newest(&[None, None]), None);
    }

    #[test]
    fn recovery_takes_the_larger_record_and_names_the_stop() {
        let r = Recovery::decide(None, None);
        assert_eq!((r.value, r.previous), (0, PreviousStop::FirstStart));
        let r = Recovery::decide(Some(50), Some(snap(3, 50, true)));
        assert_eq!(
            (r.value, r.previous, r.from_live),
            (50, PreviousStop::Clean, true)
        );
        // SIGKILL: the live record ran ahead of the last snapshot.
        let r = Recovery::decide(Some(70), Some(snap(3, 50, false)));
        assert_eq!(
            (r.value, r.previous, r.from_live),
            (70, PreviousStop::Unclean, true)
        );
        // Machine crash: the page cache was lost, the snapshot is newer than the file.
        let r = Recovery::decide(Some(20), Some(snap(3, 50, false)));
        assert_eq!(
            (r.value, r.previous, r.from_live),
            (50, PreviousStop::Unclean, false)
        );
        let r = Recovery::decide(None, Some(snap(3, 50, true)));
        assert_eq!((r.value, r.previous), (50, PreviousStop::Clean));
        let r = Recovery::decide(None, Some(snap(3, 50, false)));
        assert_eq!((r.value, r.previous), (50, PreviousStop::Unclean));
    }

    #[test]
    fn slots_alternate_and_a_torn_write_never_spoils_the_newest_whole_slot() {
        let dir = std::env::temp_dir().join(format!("ricochet-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::open(&dir).unwrap();
        let none = SnapshotRead {
            newest: None,
            damaged: false,
        };
        assert_eq!(state.read_snapshots().unwrap(), none);
        let mut w = state.writer(None).unwrap();
        w.write(10, false).unwrap();
        let second = w.write(25, true).unwrap();
        assert_eq!(state.read_snapshots().unwrap().newest, Some(second));
        let tear = |slot: usize| state.snapshots.write_all_at(&[0xff; 8], slots()[slot] + 20);
        // A torn write of seq 3 lands in slot 1 (seq 1's): seq 2 in slot 0 stands.
        tear(1).unwrap();
        assert_eq!(state.read_snapshots().unwrap().newest, Some(second));
        // Damage to the newest slot itself falls back to the older one, when whole.
        w.write(30, false).unwrap();
        tear(1).unwrap();
        assert_eq!(state.read_snapshots().unwrap().newest, Some(second));
        tear(0).unwrap();
        let read = state.read_snapshots().unwrap();
        assert!(
            read.damaged && read.newest.is_none(),
            "two torn slots are not a fresh start"
        );
        // A second opener is refused while the first holds the lock.
        assert!(StateDir::open(&dir).is_err());
        drop(state);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
