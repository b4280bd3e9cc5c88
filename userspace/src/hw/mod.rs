//! Hardware profiles: `ricochet hw check|apply|revert`. The live machine is read from sysfs and procfs
//! under a root directory (`/` normally; a fake tree in tests); queue counts and flow rules change
//! through `ethtool`, which only runs against the real root.

pub mod profile;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use profile::Profile;
use profile::{BusyPollMode, Steering};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum HwCommand {
    /// Compare the live machine with a profile; exit non-zero on any mismatch.
    Check {
        profile: PathBuf,
        /// Root of the sysfs/procfs tree to read (tests use a fake one).
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Apply a profile (channels, ntuple rules, IRQ affinity, NAPI knobs, huge pages), saving what it
    /// changes so `hw revert` can restore it.
    Apply {
        profile: PathBuf,
        /// Where to save the previous values.
        #[arg(long, default_value = "/run/ricochet/hw-state.json")]
        state: PathBuf,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Restore what the last `hw apply` changed.
    Revert {
        #[arg(long, default_value = "/run/ricochet/hw-state.json")]
        state: PathBuf,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
}

pub fn run(command: HwCommand) -> Result<()> {
    match command {
        HwCommand::Check { profile, root } => {
            let profile = Profile::load(&profile)?;
            let rows = check(&profile, &Machine::new(root));
            print!("{}", render(&rows));
            let bad = rows.iter().filter(|r| !r.ok).count();
            if bad > 0 {
                bail!("{bad} of {} checks differ from the profile: 'ricochet hw apply PROFILE' sets them", rows.len());
            }
            Ok(())
        }
        HwCommand::Apply {
            profile,
            state,
            root,
        } => {
            let profile = Profile::load(&profile)?;
            let machine = Machine::new(root);
            let saved = apply(&profile, &machine)?;
            let state = machine.path(&state);
            if let Some(dir) = state.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            std::fs::write(&state, serde_json::to_vec_pretty(&saved)?).with_context(|| {
                format!("cannot save the previous values to {}", state.display())
            })?;
            println!(
                "applied; previous values saved to {} ('ricochet hw revert' restores them)",
                state.display()
            );
            Ok(())
        }
        HwCommand::Revert { state, root } => {
            let machine = Machine::new(root);
            let state = machine.path(&state);
            let text = std::fs::read(&state).with_context(|| {
                format!(
                    "nothing to revert: {} does not exist (run 'ricochet hw apply' first)",
                    state.display()
                )
            })?;
            let saved: Saved =
                serde_json::from_slice(&text).context("the saved state is damaged")?;
            revert(&saved, &machine)?;
            std::fs::remove_file(&state)?;
            println!("reverted {} change(s)", saved.changes.len());
            Ok(())
        }
    }
}

/// The machine under a root directory.
pub struct Machine {
    root: PathBuf,
}

impl Machine {
    pub fn new(root: PathBuf) -> Machine {
        Machine { root }
    }

    fn is_real(&self) -> bool {
        self.root == Path::new("/")
    }

    /// An absolute path inside the root.
    fn path(&self, absolute: &Path) -> PathBuf {
        self.root
            .join(absolute.strip_prefix("/").unwrap_or(absolute))
    }

    fn read(&self, absolute: &str) -> Option<String> {
        std::fs::read_to_string(self.path(Path::new(absolute)))
            .ok()
            .map(|s| s.trim().to_string())
    }

    fn net(&self, iface: &str, file: &str) -> String {
        format!("/sys/class/net/{iface}/{file}")
    }

    pub fn exists(&self, iface: &str) -> bool {
        self.path(Path::new(&self.net(iface, ""))).exists()
    }

    /// The driver: the sysfs device link, or `ethtool -i` for virtual devices on the real root.
    pub fn driver(&self, iface: &str) -> Option<String> {
        if let Ok(link) =
            std::fs::read_link(self.path(Path::new(&self.net(iface, "device/driver"))))
        {
            return link.file_name().map(|n| n.to_string_lossy().to_string());
        }
        if !self.is_real() {
            return None;
        }
        let out = Command::new("ethtool").args(["-i", iface]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("driver: ").map(str::to_string))
    }

    pub fn channels(&self, iface: &str) -> Option<u32> {
        let dir = std::fs::read_dir(self.path(Path::new(&self.net(iface, "queues")))).ok()?;
        Some(
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32,
        )
    }

    /// The IRQ of each queue: /proc/interrupts lines naming the interface, queue = the name's last number.
    pub fn queue_irqs(&self, iface: &str) -> Vec<(u32, u32)> {
        let Some(text) = self.read("/proc/interrupts") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for line in text.lines() {
            let Some((irq, rest)) = line.trim_start().split_once(':') else {
                continue;
            };
            let Ok(irq) = irq.trim().parse::<u32>() else {
                continue;
            };
            let Some(name) = rest.split_whitespace().last() else {
                continue;
            };
            if !name.contains(iface) {
                continue;
            }
            let digits: String = name
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_digit())
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if let Ok(queue) = digits.parse::<u32>() {
                out.push((queue, irq));
            }
        }
        out
    }

    pub fn online_cpus(&self) -> Vec<usize> {
        self.read("/sys/devices/system/cpu/online")
            .and_then(|l| l.parse::<crate::spec::CpuList>().ok())
            .map(|l| l.0.into_iter().map(|c| c.0).collect())
            .unwrap_or_default()
    }
}

/// One line of `hw check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRow {
    pub item: String,
    pub expected: String,
    pub actual: String,
    pub ok: bool,
}

fn row(
    item: impl Into<String>,
    expected: impl fmt::Display,
    actual: Option<impl fmt::Display>,
    ok: bool,
) -> CheckRow {
    CheckRow {
        item: item.into(),
        expected: expected.to_string(),
        actual: actual
            .map(|a| a.to_string())
            .unwrap_or_else(|| "missing".into()),
        ok,
    }
}

/// Compares the machine with the profile, item by item.
pub fn check(p: &Profile, m: &Machine) -> Vec<CheckRow> {
    let iface = &p.interface.name;
    let mut rows = Vec::new();
    if !m.exists(iface) {
        rows.push(row("interface", iface, None::<String>, false));
        return rows;
    }
    let driver = m.driver(iface);
    rows.push(row(
        "driver",
        &p.interface.driver,
        driver.as_ref(),
        driver.as_deref() == Some(&p.interface.driver),
    ));
    let channels = m.channels(iface);
    rows.push(row(
        "channels",
        p.interface.channels,
        channels,
        channels == Some(p.interface.channels),
    ));
    let irqs = m.queue_irqs(iface);
    for q in &p.queues {
        let Some(want) = q.irq_cpu else { continue };
        let irq = irqs
            .iter()
            .find(|(queue, _)| *queue == q.id)
            .map(|(_, irq)| *irq);
        let actual = irq.and_then(|irq| m.read(&format!("/proc/irq/{irq}/smp_affinity_list")));
        let ok = actual.as_deref() == Some(want.to_string().as_str());
        rows.push(row(format!("queue {} IRQ CPU", q.id), want, actual, ok));
    }
    let knob = |name: &str, want: u64, rows: &mut Vec<CheckRow>| {
        let actual = m.read(&m.net(iface, name));
        let ok = actual.as_deref().and_then(|a| a.parse::<u64>().ok()) == Some(want);
        rows.push(row(name.to_string(), want, actual, ok));
    };
    if p.busy_poll.mode == BusyPollMode::Prefer {
        knob(
            "napi_defer_hard_irqs",
            u64::from(p.busy_poll.napi_defer_hard_irqs),
            &mut rows,
        );
        knob(
            "gro_flush_timeout",
            p.busy_poll.gro_flush_timeout_ns,
            &mut rows,
        );
    }
    if p.huge_pages > 0 {
        let actual = m.read("/proc/sys/vm/nr_hugepages");
        let ok = actual
            .as_deref()
            .and_then(|a| a.parse::<u64>().ok())
            .is_some_and(|n| n >= p.huge_pages);
        rows.push(row("nr_hugepages (at least)", p.huge_pages, actual, ok));
    }
    let online = m.online_cpus();
    let mut wanted: Vec<usize> = p.worker_cpus();
    wanted.extend(&p.housekeeping_cpus);
    wanted.extend(p.queues.iter().filter_map(|q| q.irq_cpu));
    wanted.sort_unstable();
    wanted.dedup();
    let missing: Vec<usize> = wanted
        .iter()
        .copied()
        .filter(|c| !online.contains(c))
        .collect();
    let online_text = online
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    rows.push(row(
        "CPUs online",
        wanted
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(","),
        Some(online_text),
        missing.is_empty(),
    ));
    rows
}

pub fn render(rows: &[CheckRow]) -> String {
    let width = rows.iter().map(|r| r.item.len()).max().unwrap_or(4).max(4);
    let mut out = format!(
        "{:width$}  {:>12}  {:>12}  ok\n",
        "item", "expected", "actual"
    );
    for r in rows {
        out.push_str(&format!(
            "{:width$}  {:>12}  {:>12}  {}\n",
            r.item,
            r.expected,
            r.actual,
            if r.ok { "yes" } else { "NO" }
        ));
    }
    out
}

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

/// Applies the profile. On a fake root, ethtool steps are reported and skipped.
pub fn apply(p: &Profile, m: &Machine) -> Result<Saved> {
    let iface = &p.interface.name;
    if !m.exists(iface) {
        bail!("no interface named '{iface}' (list them with 'ip link')");
    }
    let mut saved = Saved {
        interface: iface.clone(),
        changes: Vec::new(),
    };
    let current = m.channels(iface).unwrap_or(0);
    if current != p.interface.channels {
        if m.is_real() {
            ethtool(&["-L", iface, "combined", &p.interface.channels.to_string()]).with_context(|| {
                format!("{iface} cannot be set to {} channels (veth queues are fixed when the pair is created)", p.interface.channels)
            })?;
            saved.changes.push(Change::Channels { previous: current });
        } else {
            println!(
                "skipped on a fake root: ethtool -L {iface} combined {}",
                p.interface.channels
            );
        }
    }
    if p.interface.steering == Steering::Ntuple {
        for rule in &p.interface.ntuple {
            let args = [
                "-N",
                iface,
                "flow-type",
                "udp4",
                "dst-port",
                &rule.udp_port.to_string(),
                "action",
                &rule.queue.to_string(),
            ];
            if !m.is_real() {
                println!("skipped on a fake root: ethtool {}", args.join(" "));
                continue;
            }
            let out = ethtool(&args)?;
            if let Some(id) = out
                .split_whitespace()
                .last()
                .and_then(|w| w.parse::<u32>().ok())
            {
                saved.changes.push(Change::NtupleRule { id });
            }
        }
    }
    let write = |path: String, value: String, saved: &mut Saved| -> Result<()> {
        let full = m.path(Path::new(&path));
        let previous = std::fs::read_to_string(&full)
            .with_context(|| format!("cannot read {}", full.display()))?;
        if previous.trim() == value {
            return Ok(());
        }
        std::fs::write(&full, &value)
            .with_context(|| format!("cannot write {value} to {} (root needed)", full.display()))?;
        saved.changes.push(Change::File {
            path,
            previous: previous.trim().to_string(),
        });
        Ok(())
    };
    let irqs = m.queue_irqs(iface);
    for q in &p.queues {
        let Some(cpu) = q.irq_cpu else { continue };
        let Some((_, irq)) = irqs.iter().find(|(queue, _)| *queue == q.id) else {
            bail!(
                "no IRQ found for {iface} queue {} in /proc/interrupts",
                q.id
            );
        };
        write(
            format!("/proc/irq/{irq}/smp_affinity_list"),
            cpu.to_string(),
            &mut saved,
        )?;
    }
    if p.busy_poll.mode == BusyPollMode::Prefer {
        write(
            m.net(iface, "napi_defer_hard_irqs"),
            p.busy_poll.napi_defer_hard_irqs.to_string(),
            &mut saved,
        )?;
        write(
            m.net(iface, "gro_flush_timeout"),
            p.busy_poll.gro_flush_timeout_ns.to_string(),
            &mut saved,
        )?;
    }
    if p.huge_pages > 0 {
        let current = m
            .read("/proc/sys/vm/nr_hugepages")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if current < p.huge_pages {
            write(
                "/proc/sys/vm/nr_hugepages".into(),
                p.huge_pages.to_string(),
                &mut saved,
            )?;
        }
    }
    Ok(saved)
}

/// Undoes `apply`, last change first.
pub fn revert(saved: &Saved, m: &Machine) -> Result<()> {
    for change in saved.changes.iter().rev() {
        match change {
            Change::File { path, previous } => {
                let full = m.path(Path::new(path));
                std::fs::write(&full, previous)
                    .with_context(|| format!("cannot restore {}", full.display()))?;
            }
            Change::Channels { previous } => {
                ethtool(&["-L", &saved.interface, "combined", &previous.to_string()])?;
            }
            Change::NtupleRule { id } => {
                ethtool(&["-N", &saved.interface, "delete", &id.to_string()])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    /// A fake sysfs/procfs tree for an ice NIC eth0 with 4 queues.
    fn fake_tree() -> tempdir::TempTree {
        let t = tempdir::TempTree::new();
        let net = t.root.join("sys/class/net/eth0");
        for q in 0..4 {
            std::fs::create_dir_all(net.join(format!("queues/rx-{q}"))).unwrap();
        }
        std::fs::create_dir_all(t.root.join("sys/bus/pci/drivers/ice")).unwrap();
        std::fs::create_dir_all(net.join("device")).unwrap();
        std::os::unix::fs::symlink(
            t.root.join("sys/bus/pci/drivers/ice"),
            net.join("device/driver"),
        )
        .unwrap();
        std::fs::write(net.join("napi_defer_hard_irqs"), "0\n").unwrap();
        std::fs::write(net.join("gro_flush_timeout"), "0\n").unwrap();
        std::fs::create_dir_all(t.root.join("proc/sys/vm")).unwrap();
        std::fs::write(t.root.join("proc/sys/vm/nr_hugepages"), "0\n").unwrap();
        let mut interrupts =
            String::from("           CPU0       CPU1\n  1:    0   0   IO-APIC  1-edge  i8042\n");
        for q in 0..4 {
            interrupts.push_str(&format!(
                " {}:   10   20   PCI-MSI  ice-eth0-TxRx-{q}\n",
                40 + q
            ));
            std::fs::create_dir_all(t.root.join(format!("proc/irq/{}", 40 + q))).unwrap();
            std::fs::write(
                t.root
                    .join(format!("proc/irq/{}/smp_affinity_list", 40 + q)),
                "0-3\n",
            )
            .unwrap();
        }
        std::fs::write(t.root.join("proc/interrupts"), interrupts).unwrap();
        std::fs::create_dir_all(t.root.join("sys/devices/system/cpu")).unwrap();
        std::fs::write(t.root.join("sys/devices/system/cpu/online"), "0-7\n").unwrap();
        t
    }

    /// Temporary directories removed on drop (no crate for a dozen lines).
    mod tempdir {
        pub struct TempTree {
            pub root: std::path::PathBuf,
        }
        impl TempTree {
            pub fn new() -> TempTree {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let root = std::env::temp_dir().join(format!(
                    "ricochet-hw-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&root);
                std::fs::create_dir_all(&root).unwrap();
                TempTree { root }
            }
        }
        impl Drop for TempTree {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.root);
            }
        }
    }

    fn e810() -> Profile {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../hw-profiles/intel-e810-ice.toml"
        ))
        .unwrap();
        Profile::parse(&text).unwrap()
    }

    #[test]
    fn check_apply_check_revert_on_a_fake_tree() {
        let t = fake_tree();
        let m = Machine::new(t.root.clone());
        let mut p = e810();
        p.interface.name = "eth0".into();
        p.interface.channels = 4;
        p.queues.retain(|q| q.id < 4);
        let before = check(&p, &m);
        assert!(
            before.iter().any(|r| !r.ok),
            "the fake tree starts unconfigured"
        );
        assert!(
            before.iter().find(|r| r.item == "driver").unwrap().ok,
            "driver read from the sysfs link"
        );
        let saved = apply(&p, &m).unwrap();
        let after = check(&p, &m);
        assert!(after.iter().all(|r| r.ok), "{}", render(&after));
        revert(&saved, &m).unwrap();
        assert_eq!(check(&p, &m), before, "revert restores every value");
        assert_eq!(
            std::fs::read_to_string(t.root.join("proc/irq/40/smp_affinity_list")).unwrap(),
            "0-3"
        );
    }

    #[test]
    fn check_reports_wrong_driver_and_missing_interface() {
        let t = fake_tree();
        let m = Machine::new(t.root.clone());
        let mut p = e810();
        p.interface.name = "eth0".into();
        p.interface.driver = "mlx5_core".into();
        let rows = check(&p, &m);
        let driver = rows.iter().find(|r| r.item == "driver").unwrap();
        assert_eq!((driver.actual.as_str(), driver.ok), ("ice", false));
        p.interface.name = "eth9".into();
        let rows = check(&p, &m);
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].ok);
        assert!(apply(&p, &m).is_err());
    }
}
