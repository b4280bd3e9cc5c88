//! `hw apply` and `hw revert`. Apply writes every change to a journal (the state file) before it
//! makes it, so an apply that fails or is killed half way leaves a record of everything it may have
//! changed; revert undoes the journal last change first and is idempotent.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::profile::{BusyPollMode, Steering};
use super::{Machine, Profile};

/// What `hw apply` changed, to be undone by `hw revert`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Saved {
    pub interface: String,
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A sysfs or procfs file and its previous content.
    File { path: String, previous: String },
    /// `ethtool -L IF combined N` from this previous count.
    Channels { previous: u32 },
    /// An `ethtool -N` rule to delete.
    NtupleRule { id: u32 },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::File { path, previous } => write!(f, "{path} (was {previous})"),
            Change::Channels { previous } => write!(f, "channels (were {previous})"),
            Change::NtupleRule { id } => write!(f, "ntuple rule {id} (added)"),
        }
    }
}

/// The state file of one `hw apply`, rewritten atomically (a temporary file, then a rename) each
/// time a change is recorded, so that it is always either the previous or the next complete list.
pub struct Journal {
    path: PathBuf,
    saved: Saved,
}

impl Journal {
    /// Starts an empty journal at `path` (proving the location is writable before anything is
    /// changed). Refuses when one exists: applying again would save the profile's own values as the
    /// previous ones and lose the original values for good.
    pub fn create(path: &Path, interface: &str) -> Result<Journal> {
        if path.exists() {
            bail!(
                "a profile is still applied ({} exists): run 'ricochet hw revert --state {}' first",
                path.display(),
                path.display()
            );
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {} (root needed)", dir.display()))?;
        }
        let journal = Journal {
            path: path.to_path_buf(),
            saved: Saved {
                interface: interface.to_string(),
                changes: Vec::new(),
            },
        };
        journal.persist()?;
        Ok(journal)
    }

    /// The journal an earlier `hw apply` left.
    pub fn open(path: &Path) -> Result<Journal> {
        let text = std::fs::read(path).with_context(|| {
            format!(
                "nothing to revert: {} does not exist (run 'ricochet hw apply' first)",
                path.display()
            )
        })?;
        let saved = serde_json::from_slice(&text).with_context(|| {
            format!(
                "the saved state {} is damaged: restore its values by hand",
                path.display()
            )
        })?;
        Ok(Journal {
            path: path.to_path_buf(),
            saved,
        })
    }

    pub fn saved(&self) -> &Saved {
        &self.saved
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a change and saves the journal before returning.
    pub fn record(&mut self, change: Change) -> Result<()> {
        self.saved.changes.push(change);
        self.persist()
    }

    /// Replaces the recorded changes (after a partial revert: those still to undo).
    pub fn keep_only(&mut self, changes: Vec<Change>) -> Result<()> {
        self.saved.changes = changes;
        self.persist()
    }

    pub fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path)
            .with_context(|| format!("cannot remove {}", self.path.display()))
    }

    fn persist(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.saved)?;
        write_atomically(&self.path, &bytes)
            .with_context(|| format!("cannot save the previous values to {}", self.path.display()))
    }
}

/// Writes `bytes` to a temporary file next to `path`, flushes it to disk and renames it over `path`:
/// a reader (or a crash) sees the old content or the new, never half of it.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

fn ethtool(args: &[&str]) -> Result<String> {
    let out = Command::new("ethtool")
        .args(args)
        .output()
        .context("cannot run ethtool (apt-get install ethtool)")?;
    if !out.status.success() {
        bail!(
            "ethtool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Applies the profile, recording each change in the journal. On a fake root, ethtool steps are
/// reported and skipped. On an error, the journal lists every change made before it.
pub fn apply(p: &Profile, m: &Machine, journal: &mut Journal) -> Result<()> {
    let iface = &p.interface.name;
    if !m.exists(iface) {
        bail!("no interface named '{iface}' (list them with 'ip link')");
    }
    apply_channels(p, m, journal)?;
    if p.interface.steering == Steering::Ntuple {
        apply_ntuple(p, m, journal)?;
    }
    // Read the IRQs only now: a channel change re-creates the queues and their interrupts.
    for (path, value) in file_settings(p, m)? {
        set_file(m, journal, path, value)?;
    }
    Ok(())
}

fn apply_channels(p: &Profile, m: &Machine, journal: &mut Journal) -> Result<()> {
    let iface = &p.interface.name;
    let want = p.interface.channels;
    let current = m.channels(iface).unwrap_or(0);
    if current == want {
        return Ok(());
    }
    if !m.is_real() {
        println!("skipped on a fake root: ethtool -L {iface} combined {want}");
        return Ok(());
    }
    // Recorded first: reverting a change that did not happen finds the count unchanged and skips it.
    journal.record(Change::Channels { previous: current })?;
    ethtool(&["-L", iface, "combined", &want.to_string()]).with_context(|| {
        format!("{iface} cannot be set to {want} channels (veth queues are fixed when the pair is created)")
    })?;
    Ok(())
}

fn apply_ntuple(p: &Profile, m: &Machine, journal: &mut Journal) -> Result<()> {
    let iface = &p.interface.name;
    for rule in &p.interface.ntuple {
        let port = rule.udp_port.to_string();
        let queue = rule.queue.to_string();
        let args = [
            "-N",
            iface,
            "flow-type",
            "udp4",
            "dst-port",
            &port,
            "action",
            &queue,
        ];
        if !m.is_real() {
            println!("skipped on a fake root: ethtool {}", args.join(" "));
            continue;
        }
        // The rule's id is known only once ethtool has added it ("Added rule with ID N").
        let out = ethtool(&args)?;
        let Some(id) = out
            .split_whitespace()
            .last()
            .and_then(|w| w.parse::<u32>().ok())
        else {
            // A rule added but not recorded could never be reverted: stop and say which one.
            bail!(
                "ethtool {} added a rule but printed no rule ID ({:?}): find it with 'ethtool -n {iface}' and delete it with 'ethtool -N {iface} delete ID'",
                args.join(" "),
                out.trim()
            );
        };
        journal.record(Change::NtupleRule { id })?;
    }
    Ok(())
}

/// The sysfs and procfs files the profile sets, with their values: each served queue's IRQ
/// affinity, the NAPI knobs, huge pages.
fn file_settings(p: &Profile, m: &Machine) -> Result<Vec<(String, String)>> {
    let iface = &p.interface.name;
    let mut files = Vec::new();
    let irqs = m.queue_irqs(iface);
    for q in &p.queues {
        let Some(cpu) = q.irq_cpu else { continue };
        let mut found = irqs.iter().filter(|(queue, _)| *queue == q.id).peekable();
        if found.peek().is_none() {
            bail!(
                "no IRQ found for {iface} queue {} in /proc/interrupts (leave irq_cpu out for devices without per-queue IRQs)",
                q.id
            );
        }
        for (_, irq) in found {
            files.push((
                format!("/proc/irq/{irq}/smp_affinity_list"),
                cpu.to_string(),
            ));
        }
    }
    if p.busy_poll.mode == BusyPollMode::Prefer {
        files.push((
            m.net(iface, "napi_defer_hard_irqs"),
            p.busy_poll.napi_defer_hard_irqs.to_string(),
        ));
        files.push((
            m.net(iface, "gro_flush_timeout"),
            p.busy_poll.gro_flush_timeout_ns.to_string(),
        ));
    }
    if p.huge_pages > 0 {
        let current = m
            .read("/proc/sys/vm/nr_hugepages")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if current < p.huge_pages {
            files.push(("/proc/sys/vm/nr_hugepages".into(), p.huge_pages.to_string()));
        }
    }
    Ok(files)
}

/// Sets one file, journaling its previous value before writing.
fn set_file(m: &Machine, journal: &mut Journal, path: String, value: String) -> Result<()> {
    let full = m.path(Path::new(&path));
    let previous = std::fs::read_to_string(&full)
        .with_context(|| format!("cannot read {}", full.display()))?;
    let previous = previous.trim().to_string();
    if previous == value {
        return Ok(());
    }
    journal.record(Change::File { path, previous })?;
    std::fs::write(&full, &value)
        .with_context(|| format!("cannot write {value} to {} (root needed)", full.display()))
}

/// Undoes the changes, last first, carrying on past failures. A change already undone (or never
/// made) is skipped. Returns the changes that could not be undone, in their original order, each
/// with its error.
pub fn revert(saved: &Saved, m: &Machine) -> Vec<(Change, anyhow::Error)> {
    let mut failed: Vec<(Change, anyhow::Error)> = saved
        .changes
        .iter()
        .rev()
        .filter_map(|change| {
            undo(change, &saved.interface, m)
                .err()
                .map(|e| (change.clone(), e))
        })
        .collect();
    failed.reverse();
    failed
}

fn undo(change: &Change, iface: &str, m: &Machine) -> Result<()> {
    match change {
        Change::File { path, previous } => {
            let full = m.path(Path::new(path));
            let current = std::fs::read_to_string(&full).unwrap_or_default();
            if current.trim() == previous {
                return Ok(());
            }
            std::fs::write(&full, previous)
                .with_context(|| format!("cannot restore {}", full.display()))
        }
        Change::Channels { previous } => {
            if m.channels(iface) == Some(*previous) {
                return Ok(());
            }
            ethtool(&["-L", iface, "combined", &previous.to_string()]).map(drop)
        }
        Change::NtupleRule { id } => {
            let id = id.to_string();
            // Already gone (deleted by hand, or by an earlier revert that stopped later): undone.
            let listed = ethtool(&["-n", iface, "rule", &id]).is_ok();
            if !listed {
                return Ok(());
            }
            ethtool(&["-N", iface, "delete", &id]).map(drop)
        }
    }
}

/// `hw apply`: applies the profile; on a failure says what was changed before it and how to undo it.
pub fn apply_command(p: &Profile, m: &Machine, state: &Path) -> Result<()> {
    let mut journal = Journal::create(state, &p.interface.name)?;
    let Err(error) = apply(p, m, &mut journal) else {
        println!(
            "applied; previous values saved to {} ('ricochet hw revert' restores them)",
            state.display()
        );
        return Ok(());
    };
    let changes = &journal.saved().changes;
    if changes.is_empty() {
        journal.remove()?;
        bail!("{error:#}; nothing was changed");
    }
    let list: Vec<String> = changes.iter().map(|c| format!("  {c}")).collect();
    bail!(
        "{error:#}\n{} change(s) were made before the failure and are saved in {}:\n{}\nrun 'ricochet hw revert --state {}' to restore them",
        changes.len(),
        state.display(),
        list.join("\n"),
        state.display()
    )
}

/// `hw revert`: undoes what the journal lists; keeps what could not be undone for another try.
pub fn revert_command(m: &Machine, state: &Path) -> Result<()> {
    let mut journal = Journal::open(state)?;
    let total = journal.saved().changes.len();
    let failed = revert(journal.saved(), m);
    if failed.is_empty() {
        journal.remove()?;
        println!("reverted {total} change(s)");
        return Ok(());
    }
    let list: Vec<String> = failed
        .iter()
        .map(|(c, e)| format!("  {c}: {e:#}"))
        .collect();
    journal.keep_only(failed.into_iter().map(|(c, _)| c).collect())?;
    bail!(
        "{} of {total} change(s) could not be restored (still listed in {}):\n{}\nfix the cause and run 'ricochet hw revert' again",
        list.len(),
        state.display(),
        list.join("\n")
    )
}
