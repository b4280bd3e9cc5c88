//! The hardware profile schema (TOML, unknown fields rejected): one machine's NIC queues, worker and
//! IRQ CPUs, busy-poll settings, XDP modes and UMEM sizes. See hw-profiles/README.md.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::spec::{XdpAttachMode, ZeroCopy};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// A one-line description of the machine.
    pub description: String,
    pub interface: Interface,
    /// One entry per RX queue ricochet serves.
    #[serde(rename = "queue")]
    pub queues: Vec<Queue>,
    /// CPUs for the control plane (HTTP endpoints, kernel fallback); never a packet worker's.
    pub housekeeping_cpus: Vec<usize>,
    #[serde(default)]
    pub busy_poll: BusyPoll,
    #[serde(default)]
    pub xdp: Xdp,
    #[serde(default)]
    pub umem: Umem,
    /// Huge pages to reserve (/proc/sys/vm/nr_hugepages, at least this many); 0 leaves them alone.
    #[serde(default)]
    pub huge_pages: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    /// The kernel driver expected behind the interface (`ethtool -i`): ice, i40e, mlx5_core, ena, virtio_net, veth.
    pub driver: String,
    /// Combined channels (queues); `ethtool -L IF combined N`.
    pub channels: u32,
    #[serde(default)]
    pub steering: Steering,
    /// With `steering = "ntuple"`: UDP destination ports to steer, each to the queue listed.
    #[serde(default)]
    pub ntuple: Vec<NtupleRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Steering {
    /// Receive-side scaling spreads flows over the queues by hash.
    #[default]
    Rss,
    /// Explicit flow rules (`ethtool -N`) put listener ports on chosen queues.
    Ntuple,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NtupleRule {
    pub udp_port: u16,
    pub queue: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    pub id: u32,
    /// The CPU of the AF_XDP worker serving this queue.
    pub worker_cpu: usize,
    /// The CPU the queue's interrupt is pinned to; absent for devices without per-queue IRQs (veth).
    pub irq_cpu: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusyPollMode {
    /// Interrupt-driven NAPI.
    #[default]
    Off,
    /// SO_BUSY_POLL on the sockets.
    Socket,
    /// SO_PREFER_BUSY_POLL with deferred IRQs (napi_defer_hard_irqs, gro_flush_timeout).
    Prefer,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusyPoll {
    #[serde(default)]
    pub mode: BusyPollMode,
    /// /sys/class/net/IF/napi_defer_hard_irqs.
    #[serde(default)]
    pub napi_defer_hard_irqs: u32,
    /// /sys/class/net/IF/gro_flush_timeout, nanoseconds.
    #[serde(default)]
    pub gro_flush_timeout_ns: u64,
    /// SO_BUSY_POLL on the AF_XDP sockets, microseconds.
    #[serde(default)]
    pub usecs: u32,
    /// SO_BUSY_POLL_BUDGET.
    #[serde(default)]
    pub budget: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xdp {
    #[serde(default)]
    pub mode: XdpAttachMode,
    #[serde(default)]
    pub zero_copy: ZeroCopy,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Umem {
    #[serde(default = "default_frame_size")]
    pub frame_size: u32,
    #[serde(default = "default_frame_count")]
    pub frame_count: u32,
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    #[serde(default)]
    pub huge_pages: bool,
}

impl Default for Umem {
    fn default() -> Self {
        Umem {
            frame_size: default_frame_size(),
            frame_count: default_frame_count(),
            ring_size: default_ring_size(),
            huge_pages: false,
        }
    }
}

fn default_frame_size() -> u32 {
    2048
}
fn default_frame_count() -> u32 {
    4096
}
fn default_ring_size() -> u32 {
    1024
}

impl Profile {
    pub fn load(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read profile {}", path.display()))?;
        Profile::parse(&text).with_context(|| format!("profile {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Profile> {
        let profile: Profile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        profile.validate()?;
        Ok(profile)
    }

    /// Checks what the schema alone cannot.
    fn validate(&self) -> Result<()> {
        let name = &self.interface.name;
        // The kernel's dev_valid_name(): the name also becomes a path under /sys/class/net.
        if name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name.contains(['/', ':'])
            || name.chars().any(char::is_whitespace)
        {
            bail!("interface.name {name:?} is not a Linux interface name (1 to 15 bytes, no '/', ':' or white space)");
        }
        if self.queues.is_empty() {
            bail!("a profile lists at least one [[queue]]");
        }
        let mut seen = std::collections::BTreeSet::new();
        for q in &self.queues {
            if q.id >= self.interface.channels {
                bail!(
                    "queue {} is beyond the {} channels of {}",
                    q.id,
                    self.interface.channels,
                    self.interface.name
                );
            }
            if !seen.insert(q.id) {
                bail!("queue {} is listed twice", q.id);
            }
            if self.housekeeping_cpus.contains(&q.worker_cpu) {
                bail!(
                    "CPU {} is both queue {}'s worker CPU and a housekeeping CPU",
                    q.worker_cpu,
                    q.id
                );
            }
        }
        if self.interface.steering == Steering::Ntuple && self.interface.ntuple.is_empty() {
            bail!("steering = \"ntuple\" needs [[interface.ntuple]] rules");
        }
        for rule in &self.interface.ntuple {
            if !self.queues.iter().any(|q| q.id == rule.queue) {
                bail!("the ntuple rule for UDP port {} targets queue {}, which the profile does not serve", rule.udp_port, rule.queue);
            }
        }
        if !matches!(self.umem.frame_size, 2048 | 4096) {
            bail!("umem.frame_size must be 2048 or 4096");
        }
        if !self.umem.ring_size.is_power_of_two() {
            bail!("umem.ring_size must be a power of two");
        }
        Ok(())
    }

    pub fn queue_ids(&self) -> Vec<u32> {
        self.queues.iter().map(|q| q.id).collect()
    }

    pub fn worker_cpus(&self) -> Vec<usize> {
        self.queues.iter().map(|q| q.worker_cpu).collect()
    }
}
