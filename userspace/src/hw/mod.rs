//! Hardware profiles: `ricochet hw check|apply|revert`. The live machine is read from sysfs and procfs
//! under a root directory (`/` normally; a fake tree in tests); queue counts and flow rules change
//! through `ethtool`, which only runs against the real root.

mod apply;
pub mod profile;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

pub use apply::{apply, revert, Change, Journal, Saved};
use profile::BusyPollMode;
pub use profile::Profile;

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
            apply::apply_command(&profile, &machine, &machine.path(&state))
        }
        HwCommand::Revert { state, root } => {
            let machine = Machine::new(root);
            apply::revert_command(&machine, &machine.path(&state))
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
        crate::iface::rx_queue_count_under(&self.root, iface).ok()
    }

    /// The IRQs of the interface's queues as (queue, IRQ) pairs: the /proc/interrupts lines whose
    /// name has the interface as a whole token (see [`irq_queue`]). A queue can have two (separate
    /// RX and TX interrupts).
    pub fn queue_irqs(&self, iface: &str) -> Vec<(u32, u32)> {
        let Some(text) = self.read("/proc/interrupts") else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|line| {
                let (irq, rest) = line.trim_start().split_once(':')?;
                let irq = irq.trim().parse::<u32>().ok()?;
                let name = rest.split_whitespace().last()?;
                Some((irq_queue(name, iface)?, irq))
            })
            .collect()
    }

    pub fn online_cpus(&self) -> Vec<usize> {
        self.read("/sys/devices/system/cpu/online")
            .and_then(|l| l.parse::<crate::spec::CpuList>().ok())
            .map(|l| l.0.into_iter().map(|c| c.0).collect())
            .unwrap_or_default()
    }
}

/// The queue an interrupt serves when its name (the last column of /proc/interrupts) names the
/// interface as a whole token, between separators (`-`, `@`, `:`, `_`) or the ends of the name: the
/// number that ends the rest of the name. `ice-eth0-TxRx-3`, `eth0-TxRx-3` and `i40e-eth0-TxRx-3`
/// are eth0's queue 3; `eth10-TxRx-3` is not eth1's; `eth0` alone (a link interrupt) is no queue's.
/// mlx5 (`mlx5_comp3@pci:...`) and virtio (`virtio0-input.0`) do not name the interface at all.
pub fn irq_queue(name: &str, iface: &str) -> Option<u32> {
    const SEPARATORS: &[char] = &['-', '@', ':', '_'];
    if iface.is_empty() {
        return None;
    }
    let (at, _) = name.match_indices(iface).find(|&(at, _)| {
        let before = name[..at].chars().next_back();
        let after = name[at + iface.len()..].chars().next();
        before.is_none_or(|c| SEPARATORS.contains(&c))
            && after.is_none_or(|c| SEPARATORS.contains(&c))
    })?;
    let rest = &name[at + iface.len()..];
    let digits = rest.len() - rest.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    rest[rest.len() - digits..].parse().ok()
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
    check_irqs(p, m, &mut rows);
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
    rows.push(check_cpus(p, m));
    rows
}

/// One row per IRQ of each queue the profile pins (a missing IRQ is a failed row).
fn check_irqs(p: &Profile, m: &Machine, rows: &mut Vec<CheckRow>) {
    let irqs = m.queue_irqs(&p.interface.name);
    for q in &p.queues {
        let Some(want) = q.irq_cpu else { continue };
        let mut found = irqs.iter().filter(|(queue, _)| *queue == q.id).peekable();
        if found.peek().is_none() {
            rows.push(row(
                format!("queue {} IRQ CPU", q.id),
                want,
                None::<String>,
                false,
            ));
        }
        for (_, irq) in found {
            let actual = m.read(&format!("/proc/irq/{irq}/smp_affinity_list"));
            let ok = actual.as_deref() == Some(want.to_string().as_str());
            rows.push(row(
                format!("queue {} IRQ {irq} CPU", q.id),
                want,
                actual,
                ok,
            ));
        }
    }
}

/// Every CPU the profile names (workers, housekeeping, IRQs) is online.
fn check_cpus(p: &Profile, m: &Machine) -> CheckRow {
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
    row(
        "CPUs online",
        wanted
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(","),
        Some(online_text),
        missing.is_empty(),
    )
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

#[cfg(test)]
mod test {
    use super::*;

    /// A fake sysfs/procfs tree: 8 CPUs online, no huge pages, and an ice NIC eth0 with 4 queues
    /// whose IRQs 40-43 may run on CPUs 0-3.
    fn fake_tree() -> tempdir::TempTree {
        let t = tempdir::TempTree::new();
        std::fs::create_dir_all(t.root.join("sys/bus/pci/drivers/ice")).unwrap();
        std::fs::create_dir_all(t.root.join("proc/sys/vm")).unwrap();
        std::fs::write(t.root.join("proc/sys/vm/nr_hugepages"), "0\n").unwrap();
        std::fs::create_dir_all(t.root.join("sys/devices/system/cpu")).unwrap();
        std::fs::write(t.root.join("sys/devices/system/cpu/online"), "0-7\n").unwrap();
        let interrupts =
            String::from("           CPU0       CPU1\n  1:    0   0   IO-APIC  1-edge  i8042\n");
        std::fs::write(t.root.join("proc/interrupts"), interrupts).unwrap();
        add_nic(&t, "eth0", 4, 40);
        t
    }

    /// Adds an ice interface with `queues` queues whose IRQs are `first_irq`.. to a fake tree.
    fn add_nic(t: &tempdir::TempTree, iface: &str, queues: u32, first_irq: u32) {
        let net = t.root.join("sys/class/net").join(iface);
        for q in 0..queues {
            std::fs::create_dir_all(net.join(format!("queues/rx-{q}"))).unwrap();
        }
        std::fs::create_dir_all(net.join("device")).unwrap();
        std::os::unix::fs::symlink(
            t.root.join("sys/bus/pci/drivers/ice"),
            net.join("device/driver"),
        )
        .unwrap();
        std::fs::write(net.join("napi_defer_hard_irqs"), "0\n").unwrap();
        std::fs::write(net.join("gro_flush_timeout"), "0\n").unwrap();
        let mut interrupts = std::fs::read_to_string(t.root.join("proc/interrupts")).unwrap();
        for q in 0..queues {
            let irq = first_irq + q;
            interrupts.push_str(&format!(
                " {irq}:   10   20   PCI-MSI  {irq}-edge  ice-{iface}-TxRx-{q}\n"
            ));
            let dir = t.root.join(format!("proc/irq/{irq}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("smp_affinity_list"), "0-3\n").unwrap();
        }
        std::fs::write(t.root.join("proc/interrupts"), interrupts).unwrap();
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

    /// The E810 profile cut down to `iface` with 4 queues.
    fn e810(iface: &str) -> Profile {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../hw-profiles/intel-e810-ice.toml"
        ))
        .unwrap();
        let mut p = Profile::parse(&text).unwrap();
        p.interface.name = iface.into();
        p.interface.channels = 4;
        p.queues.retain(|q| q.id < 4);
        p
    }

    fn read(t: &tempdir::TempTree, path: &str) -> String {
        std::fs::read_to_string(t.root.join(path))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn check_apply_check_revert_on_a_fake_tree() {
        let t = fake_tree();
        let m = Machine::new(t.root.clone());
        let p = e810("eth0");
        let before = check(&p, &m);
        assert!(
            before.iter().any(|r| !r.ok),
            "the fake tree starts unconfigured"
        );
        assert!(
            before.iter().find(|r| r.item == "driver").unwrap().ok,
            "driver read from the sysfs link"
        );
        let state = t.root.join("run/ricochet/hw-state.json");
        let mut journal = Journal::create(&state, "eth0").unwrap();
        apply(&p, &m, &mut journal).unwrap();
        let after = check(&p, &m);
        assert!(after.iter().all(|r| r.ok), "{}", render(&after));
        let saved = Journal::open(&state).unwrap().saved().clone();
        assert_eq!(&saved, journal.saved(), "the state file holds every change");
        assert!(revert(&saved, &m).is_empty());
        assert_eq!(check(&p, &m), before, "revert restores every value");
        assert_eq!(read(&t, "proc/irq/40/smp_affinity_list"), "0-3");
        assert!(
            revert(&saved, &m).is_empty(),
            "reverting twice finds nothing left to do"
        );
    }

    #[test]
    fn a_failure_half_way_leaves_a_state_file_that_revert_restores() {
        let t = fake_tree();
        let m = Machine::new(t.root.clone());
        let p = e810("eth0");
        // The last file apply sets cannot be read: the four IRQs and napi_defer_hard_irqs are
        // already changed when it fails.
        let gro = t.root.join("sys/class/net/eth0/gro_flush_timeout");
        std::fs::remove_file(&gro).unwrap();
        std::fs::create_dir(&gro).unwrap();
        let state = t.root.join("run/ricochet/hw-state.json");
        let error = apply::apply_command(&p, &m, &state).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("5 change(s) were made before the failure")
                && message.contains("/proc/irq/40/smp_affinity_list (was 0-3)")
                && message.contains("ricochet hw revert --state"),
            "{message}"
        );
        assert_eq!(read(&t, "proc/irq/43/smp_affinity_list"), "5");
        assert_eq!(read(&t, "sys/class/net/eth0/napi_defer_hard_irqs"), "2");
        let saved = Journal::open(&state).unwrap().saved().clone();
        assert_eq!(saved.changes.len(), 5, "{saved:?}");
        apply::revert_command(&m, &state).unwrap();
        for irq in 40..44 {
            assert_eq!(
                read(&t, &format!("proc/irq/{irq}/smp_affinity_list")),
                "0-3"
            );
        }
        assert_eq!(read(&t, "sys/class/net/eth0/napi_defer_hard_irqs"), "0");
        assert!(!state.exists(), "a complete revert removes the state file");
    }

    #[test]
    fn a_failure_before_any_change_leaves_no_state_file() {
        let t = fake_tree();
        let m = Machine::new(t.root.clone());
        let mut p = e810("eth0");
        p.queues[0].irq_cpu = Some(4);
        std::fs::write(
            t.root.join("proc/interrupts"),
            "  1:  0  0  IO-APIC  i8042\n",
        )
        .unwrap();
        let state = t.root.join("run/ricochet/hw-state.json");
        let error = apply::apply_command(&p, &m, &state).unwrap_err();
        assert!(
            format!("{error:#}").contains("nothing was changed"),
            "{error:#}"
        );
        assert!(!state.exists());
    }

    #[test]
    fn a_second_apply_is_refused_while_the_first_is_in_effect() {
        let t = fake_tree();
        let m = Machine::new(t.root.clone());
        let p = e810("eth0");
        let state = t.root.join("run/ricochet/hw-state.json");
        apply::apply_command(&p, &m, &state).unwrap();
        let first = std::fs::read(&state).unwrap();
        let error = apply::apply_command(&p, &m, &state).unwrap_err();
        assert!(format!("{error:#}").contains("still applied"), "{error:#}");
        assert_eq!(
            std::fs::read(&state).unwrap(),
            first,
            "the original values are kept"
        );
        apply::revert_command(&m, &state).unwrap();
        assert_eq!(read(&t, "proc/irq/41/smp_affinity_list"), "0-3");
    }

    #[test]
    fn revert_keeps_what_it_could_not_restore() {
        let t = fake_tree();
        let m = Machine::new(t.root.clone());
        let p = e810("eth0");
        let state = t.root.join("run/ricochet/hw-state.json");
        apply::apply_command(&p, &m, &state).unwrap();
        let knob = t.root.join("sys/class/net/eth0/napi_defer_hard_irqs");
        std::fs::remove_file(&knob).unwrap();
        std::fs::create_dir(&knob).unwrap();
        let error = apply::revert_command(&m, &state).unwrap_err();
        assert!(
            format!("{error:#}").contains("1 of 7 change(s) could not be restored"),
            "{error:#}"
        );
        assert_eq!(
            read(&t, "proc/irq/40/smp_affinity_list"),
            "0-3",
            "the rest is restored"
        );
        let left = Journal::open(&state).unwrap().saved().changes.clone();
        assert_eq!(left.len(), 1);
        assert!(
            left[0].to_string().contains("napi_defer_hard_irqs"),
            "{left:?}"
        );
        std::fs::remove_dir(&knob).unwrap();
        std::fs::write(&knob, "2").unwrap();
        apply::revert_command(&m, &state).unwrap();
        assert_eq!(read(&t, "sys/class/net/eth0/napi_defer_hard_irqs"), "0");
    }

    #[test]
    fn irq_names_match_the_interface_as_a_whole_token() {
        assert_eq!(irq_queue("ice-eth0-TxRx-3", "eth0"), Some(3));
        assert_eq!(irq_queue("eth0-TxRx-12", "eth0"), Some(12));
        assert_eq!(irq_queue("i40e-eth1-TxRx-2", "eth1"), Some(2));
        assert_eq!(irq_queue("eth0-rx-1", "eth0"), Some(1));
        assert_eq!(irq_queue("eth10-TxRx-0", "eth1"), None);
        assert_eq!(irq_queue("ice-eth10-TxRx-0", "eth1"), None);
        assert_eq!(irq_queue("ice-veth1-TxRx-0", "eth1"), None);
        assert_eq!(irq_queue("ice-eth10-TxRx-7", "eth10"), Some(7));
        assert_eq!(irq_queue("eth0", "eth0"), None, "a link interrupt");
        assert_eq!(irq_queue("eth0-TxRx", "eth0"), None);
        assert_eq!(irq_queue("mlx5_comp3@pci:0000:08:00.0", "eth0"), None);
        assert_eq!(irq_queue("virtio0-input.0", "eth0"), None);
        assert_eq!(irq_queue("ice-eth0-TxRx-3", ""), None);
        assert_eq!(
            irq_queue("enp65s0f0np0-TxRx-5", "enp65s0f0np0"),
            Some(5),
            "a long predictable name"
        );
    }

    #[test]
    fn eth1_never_takes_eth10s_irqs() {
        let t = fake_tree();
        add_nic(&t, "eth10", 4, 60);
        add_nic(&t, "eth1", 4, 50);
        let m = Machine::new(t.root.clone());
        let mut eth1 = m.queue_irqs("eth1");
        eth1.sort_unstable();
        assert_eq!(eth1, [(0, 50), (1, 51), (2, 52), (3, 53)]);
        let state = t.root.join("run/ricochet/hw-state.json");
        apply::apply_command(&e810("eth1"), &m, &state).unwrap();
        for irq in 50..54 {
            assert_ne!(
                read(&t, &format!("proc/irq/{irq}/smp_affinity_list")),
                "0-3"
            );
        }
        for irq in 60..64 {
            assert_eq!(
                read(&t, &format!("proc/irq/{irq}/smp_affinity_list")),
                "0-3",
                "eth10's IRQ {irq} is left alone"
            );
        }
    }

    #[test]
    fn check_reports_wrong_driver_and_missing_interface() {
        let t = fake_tree();
        let m = Machine::new(t.root.clone());
        let mut p = e810("eth0");
        p.interface.driver = "mlx5_core".into();
        let rows = check(&p, &m);
        let driver = rows.iter().find(|r| r.item == "driver").unwrap();
        assert_eq!((driver.actual.as_str(), driver.ok), ("ice", false));
        p.interface.name = "eth9".into();
        let rows = check(&p, &m);
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].ok);
        let state = t.root.join("run/ricochet/hw-state.json");
        assert!(apply::apply_command(&p, &m, &state).is_err());
        assert!(!state.exists());
    }
}
