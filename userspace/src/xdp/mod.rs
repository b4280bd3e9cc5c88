//! The XDP programs (`ebpf/ricochet.bpf.c`): loading one, configuring its listeners, attaching it to
//! an interface through a BPF link (so it disappears with the process), sharing its counter, reading
//! its per-CPU statistics, and running it on crafted frames with BPF_PROG_TEST_RUN.

pub mod counter;
pub mod maps;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, XskMap};
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::Ebpf;

use crate::core::Protocol;
use crate::spec::XdpAttachMode;
use crate::stats::{DropReason, TcpLiteStats};
use counter::MappedCounter;
use maps::{ListenerKey, ListenerValue, TcpConnRecord, TcpFlowKey, TcpProgramSettings, XdpStat};

/// The compiled programs, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ricochet.bpf.o"));

/// Which program of the object to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    /// Steer listener frames into AF_XDP sockets (afxdp mode).
    Steer,
    /// Verify, count and answer listener frames with XDP_TX (xdp mode).
    Respond,
}

impl ProgramKind {
    const fn name(self) -> &'static str {
        match self {
            ProgramKind::Steer => "ricochet_steer",
            ProgramKind::Respond => "ricochet_respond",
        }
    }
}

/// The mode an attachment ended up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachedMode {
    Native,
    Generic,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        })
    }
}

/// A loaded program, attached or not.
pub struct XdpProgram {
    ebpf: Ebpf,
    kind: ProgramKind,
    /// The per-CPU counters, shareable with the HTTP endpoints.
    stats: std::sync::Arc<PerCpuArray<MapData, u64>>,
}

/// The verdicts XDP programs return (`enum xdp_action`).
pub mod action {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}

fn explain_bpf_error(
    e: impl std::error::Error + Send + Sync + 'static,
    what: &str,
) -> anyhow::Error {
    let text = format!("{e:#}");
    let hint = if text.contains("Operation not permitted") || text.contains("EPERM") {
        ": loading XDP programs needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    } else {
        ""
    };
    anyhow!(e).context(format!("{what}{hint}"))
}

/// TCP-lite in the responder program (xdp mode): its listeners, limits and cookie secret.
#[derive(Debug, Clone)]
pub struct ResponderTcp {
    pub listeners: Vec<(SocketAddr, Protocol)>,
    pub max_conns: u32,
    pub idle_timeout_secs: u32,
    /// The largest MSS the SYN-ACK offers (the interface's MTU less the IPv6 and TCP headers).
    pub max_mss: u16,
    /// The SipHash key of the SYN cookies (as `tcp_lite::Cookies::new` takes it).
    pub secret: [u8; 16],
}

/// The program that forgets idle TCP-lite connections; userspace runs it once a second.
const TCP_EXPIRE: &str = "ricochet_tcp_expire";

impl XdpProgram {
    /// Loads one program into the kernel (verifier included) with its listeners configured.
    pub fn load(kind: ProgramKind, listeners: &[(SocketAddr, Protocol)]) -> Result<XdpProgram> {
        let ebpf =
            Ebpf::load(OBJECT).map_err(|e| explain_bpf_error(e, "cannot load the XDP programs"))?;
        XdpProgram::finish_load(ebpf, kind, listeners)
    }

    /// Loads the responder (xdp mode) with its UDP listeners and TCP-lite.
    pub fn load_responder(
        listeners: &[(SocketAddr, Protocol)],
        tcp: &ResponderTcp,
    ) -> Result<XdpProgram> {
        let ebpf = aya::EbpfLoader::new()
            .map_max_entries("tcp_conns", tcp.max_conns.max(1))
            .load(OBJECT)
            .map_err(|e| explain_bpf_error(e, "cannot load the XDP programs"))?;
        let mut program = XdpProgram::finish_load(ebpf, ProgramKind::Respond, listeners)?;
        load_program(&mut program.ebpf, TCP_EXPIRE)?;
        program.add_tcp_listeners(&tcp.listeners)?;
        let (k0, k1) = tcp.secret.split_at(8);
        let settings = TcpProgramSettings {
            k0: u64::from_le_bytes(k0.try_into().expect("8 bytes")),
            k1: u64::from_le_bytes(k1.try_into().expect("8 bytes")),
            idle_timeout: tcp.idle_timeout_secs,
            max_mss: tcp.max_mss,
            pad: 0,
        };
        let mut map: Array<&mut MapData, TcpProgramSettings> = Array::try_from(
            program
                .ebpf
                .map_mut("tcp_settings")
                .context("no tcp_settings map")?,
        )?;
        map.set(0, settings, 0)
            .context("cannot configure TCP-lite in the XDP program")?;
        Ok(program)
    }

    fn finish_load(
        mut ebpf: Ebpf,
        kind: ProgramKind,
        listeners: &[(SocketAddr, Protocol)],
    ) -> Result<XdpProgram> {
        load_program(&mut ebpf, kind.name())?;
        let stats_map = ebpf
            .take_map("xdp_stats")
            .context("the BPF object has no xdp_stats map")?;
        let stats = std::sync::Arc::new(PerCpuArray::try_from(stats_map)?);
        let mut program = XdpProgram { ebpf, kind, stats };
        program.set_listeners(listeners)?;
        Ok(program)
    }

    /// The global counter the responder program adds to, mapped into this process.
    pub fn counter(&self) -> Result<MappedCounter> {
        let Some(Map::Array(data)) = self.ebpf.map("counter") else {
            bail!("the BPF object has no counter array");
        };
        MappedCounter::map(data.fd())
            .context("cannot mmap the counter map (needs BPF_F_MMAPABLE, kernel 5.5+)")
    }

    /// Pins the counter map at `path` in bpffs (replacing an older pin), so that it outlives this
    /// process: the next start reads it back with [`read_pinned_counter`].
    pub fn pin_counter(&self, path: &std::path::Path) -> Result<()> {
        let Some(Map::Array(data)) = self.ebpf.map("counter") else {
            bail!("the BPF object has no counter array");
        };
        // Pinned beside the old pin, then renamed over it: there is always one pin.
        // (bpffs refuses names with a dot.)
        let mut fresh = path.as_os_str().to_owned();
        fresh.push("-new");
        let fresh = std::path::PathBuf::from(fresh);
        let _ = std::fs::remove_file(&fresh);
        data.pin(&fresh)
            .with_context(|| format!("cannot pin the counter map at {}", fresh.display()))?;
        std::fs::rename(&fresh, path).with_context(|| {
            format!(
                "cannot rename the pin {} to {}",
                fresh.display(),
                path.display()
            )
        })
    }

    /// The requests the program answered or dropped itself, as (replies, drops by reason).
    pub fn in_kernel_totals(&self) -> Result<InKernelTotals> {
        Ok(in_kernel_totals(&self.stats()?))
    }

    /// A reader of [`XdpProgram::in_kernel_totals`] for other threads; it keeps working after the
    /// program is dropped (it holds the map).
    pub fn totals_reader(&self) -> impl Fn() -> Option<InKernelTotals> + Send + Sync + 'static {
        let stats = self.stats.clone();
        move || {
            read_stats(&stats)
                .ok()
                .map(|values| in_kernel_totals(&values))
        }
    }

    /// Replaces the listener table.
    pub fn set_listeners(&mut self, listeners: &[(SocketAddr, Protocol)]) -> Result<()> {
        let mut map: HashMap<&mut MapData, ListenerKey, ListenerValue> =
            HashMap::try_from(self.ebpf.map_mut("listeners").context("no listeners map")?)?;
        let stale: Vec<ListenerKey> = map.keys().filter_map(|k| k.ok()).collect();
        for key in stale {
            map.remove(&key)?;
        }
        for (addr, protocol) in listeners {
            map.insert(ListenerKey::new(*addr), ListenerValue::new(*protocol), 0)
                .with_context(|| format!("cannot add listener {addr} to the XDP program"))?;
        }
        Ok(())
    }

    /// Adds TCP listeners to the table: the steering program sends their segments to the AF_XDP
    /// workers' TCP-lite (afxdp mode).
    pub fn add_tcp_listeners(&mut self, listeners: &[(SocketAddr, Protocol)]) -> Result<()> {
        let mut map: HashMap<&mut MapData, ListenerKey, ListenerValue> =
            HashMap::try_from(self.ebpf.map_mut("listeners").context("no listeners map")?)?;
        for (addr, protocol) in listeners {
            map.insert(ListenerKey::tcp(*addr), ListenerValue::new(*protocol), 0)
                .with_context(|| format!("cannot add TCP listener {addr} to the XDP program"))?;
        }
        Ok(())
    }

    fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(self.kind.name())
            .expect("loaded in load()")
            .try_into()
            .expect("an XDP program")
    }

    /// Attaches to `iface` through a BPF link: the kernel detaches it when the process exits, however
    /// it exits. Refuses to replace a program someone else attached unless `force`.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: XdpAttachMode,
        force: bool,
    ) -> Result<AttachedMode> {
        let attempts: &[(XdpMode, AttachedMode)] = match mode {
            XdpAttachMode::Native => &[(XdpMode::Driver, AttachedMode::Native)],
            XdpAttachMode::Generic => &[(XdpMode::Skb, AttachedMode::Generic)],
            XdpAttachMode::Auto => &[
                (XdpMode::Driver, AttachedMode::Native),
                (XdpMode::Skb, AttachedMode::Generic),
            ],
        };
        let mut forced = false;
        let mut last_error = None;
        let mut i = 0;
        while i < attempts.len() {
            let (xdp_mode, attached) = attempts[i];
            match self.program().attach(iface, xdp_mode) {
                Ok(_) => {
                    if i > 0 {
                        tracing::warn!(
                            "{iface}: native XDP refused ({}), running in generic mode",
                            last_error
                                .as_ref()
                                .map(|e: &ProgramError| format!("{e:#}"))
                                .unwrap_or_default()
                        );
                    }
                    return Ok(attached);
                }
                Err(ProgramError::UnknownInterface { .. }) => {
                    bail!("no interface named '{iface}': list them with 'ip link'")
                }
                Err(e) if is_errno(&e, libc::EBUSY) || is_errno(&e, libc::EEXIST) => {
                    if !force || forced {
                        bail!("another XDP program is attached to {iface}: detach it ('ip link set dev {iface} xdp off') or pass --force to replace it");
                    }
                    detach_foreign(iface)?;
                    forced = true;
                    continue;
                }
                Err(e) if is_errno(&e, libc::EPERM) => {
                    bail!("attaching XDP to {iface} needs root (or CAP_NET_ADMIN and CAP_BPF)")
                }
                Err(e) => last_error = Some(e),
            }
            i += 1;
        }
        let e = last_error.expect("at least one attempt failed");
        Err(anyhow!(e)).with_context(|| format!("cannot attach XDP to {iface} in {mode:?} mode: the driver may not support it; try --xdp-mode generic or auto"))
    }

    /// Forgets the TCP-lite connections idle for longer than the timeout (the responder's
    /// `ricochet_tcp_expire`, run on an empty frame). The responder also forgets an idle connection
    /// when its next segment comes; this frees the table for new ones.
    pub fn expire_tcp(&self) -> Result<()> {
        let prog: &Xdp = self
            .ebpf
            .program(TCP_EXPIRE)
            .context("the responder was loaded without TCP-lite")?
            .try_into()?;
        let frame = [0u8; 64];
        let opts = TestRunOptions {
            data_in: Some(&frame),
            ..TestRunOptions::default()
        };
        prog.test_run(opts)
            .context("cannot run the TCP-lite expiry program")?;
        Ok(())
    }

    /// TCP-lite connections in the responder's table now.
    pub fn tcp_connections(&self) -> Result<usize> {
        let map: HashMap<&MapData, TcpFlowKey, TcpConnRecord> =
            HashMap::try_from(self.ebpf.map("tcp_conns").context("no tcp_conns map")?)?;
        Ok(map.keys().filter(|k| k.is_ok()).count())
    }

    /// The AF_XDP socket table, indexed by RX queue.
    pub fn xsk_map(&mut self) -> Result<XskMap<&mut MapData>> {
        Ok(XskMap::try_from(
            self.ebpf.map_mut("xsks").context("no xsks map")?,
        )?)
    }

    /// Registers an AF_XDP socket for an RX queue.
    pub fn register_socket(&mut self, queue: u32, fd: impl AsRawFd) -> Result<()> {
        self.xsk_map()?
            .set(queue, fd, 0)
            .with_context(|| format!("cannot register the AF_XDP socket of queue {queue}"))
    }

    /// The program's counters summed over CPUs.
    pub fn stats(&self) -> Result<[u64; XdpStat::COUNT]> {
        read_stats(&self.stats)
    }

    /// A reader of the same counters for other threads (the HTTP endpoints).
    pub fn stats_reader(
        &self,
    ) -> impl Fn() -> Option<Vec<(&'static str, u64)>> + Send + Sync + 'static {
        let stats = self.stats.clone();
        move || {
            let values = read_stats(&stats).ok()?;
            Some(
                XdpStat::ALL
                    .iter()
                    .map(|s| (s.as_str(), values[*s as usize]))
                    .collect(),
            )
        }
    }

    /// How many instructions the verifier processed to accept the program (its budget is one
    /// million). None on kernels before 5.16, which do not report it.
    pub fn verified_instructions(&mut self) -> Result<Option<u32>> {
        let info = self
            .program()
            .info()
            .context("cannot read the XDP program's info")?;
        Ok(info.verified_instruction_count())
    }

    /// Runs the program once on `frame` (BPF_PROG_TEST_RUN); returns the verdict and the output
    /// frame's length in `out`.
    pub fn test_run(&mut self, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize)> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            ..TestRunOptions::default()
        };
        let result = self
            .program()
            .test_run(opts)
            .context("BPF_PROG_TEST_RUN failed")?;
        Ok((result.return_value, result.data_size_out as usize))
    }
}

/// Loads the program `name` of the object into the kernel.
fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the BPF object has no program {name}"))?
        .try_into()?;
    prog.load()
        .map_err(|e| explain_bpf_error(e, &format!("the kernel rejected the XDP program {name}")))
}

/// The value of a counter map pinned at `path` by an earlier run, or None if there is no pin.
pub fn read_pinned_counter(path: &std::path::Path) -> Result<Option<u64>> {
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(path)
        .with_context(|| format!("cannot open the pinned counter map {}", path.display()))?;
    let counter = MappedCounter::map(data.fd()).context("cannot mmap the pinned counter map")?;
    Ok(Some(crate::core::Counter::load(&counter)))
}

/// What an XDP program answered itself, and what it dropped by reason.
pub type InKernelTotals = (u64, Vec<(DropReason, u64)>);

fn in_kernel_totals(stats: &[u64; XdpStat::COUNT]) -> InKernelTotals {
    let drops = XdpStat::ALL
        .iter()
        .filter_map(|s| s.drop_reason().map(|r| (r, stats[*s as usize])))
        .collect();
    let replies = stats[XdpStat::Tx as usize] + stats[XdpStat::TcpReplies as usize];
    (replies, drops)
}

/// The responder's TCP-lite counts, as (counts, connections closed, connections rejected).
pub fn in_kernel_tcp(stats: &[u64; XdpStat::COUNT]) -> (TcpLiteStats, u64, u64) {
    let get = |s: XdpStat| stats[s as usize];
    let tcp = TcpLiteStats {
        handshakes: get(XdpStat::TcpHandshakes),
        cookie_failures: get(XdpStat::TcpCookieFailures),
        retransmitted: get(XdpStat::TcpRetransmitted),
        out_of_order: get(XdpStat::TcpOutOfOrder),
        resets_sent: get(XdpStat::TcpResetsSent),
        table_full: get(XdpStat::TcpTableFull),
        idle_closed: get(XdpStat::TcpIdleClosed),
    };
    (tcp, get(XdpStat::TcpClosed), get(XdpStat::TcpRejected))
}

fn read_stats(array: &PerCpuArray<MapData, u64>) -> Result<[u64; XdpStat::COUNT]> {
    let mut out = [0u64; XdpStat::COUNT];
    for stat in XdpStat::ALL {
        out[stat as usize] = array.get(&(stat as u32), 0)?.iter().sum();
    }
    Ok(out)
}

fn is_errno(e: &ProgramError, errno: i32) -> bool {
    // Walk the source chain down to the io::Error of the failed syscall.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.raw_os_error() == Some(errno);
        }
        source = err.source();
    }
    false
}

/// Detaches an XDP program attached through netlink by someone else (`--force`). A program held by
/// another process's BPF link cannot be removed this way: that process must stop.
fn detach_foreign(iface: &str) -> Result<()> {
    tracing::warn!("--force: detaching the XDP program already attached to {iface}");
    for kind in ["xdp", "xdpgeneric", "xdpdrv"] {
        let _ = Command::new("ip")
            .args(["link", "set", "dev", iface, kind, "off"])
            .status();
    }
    Ok(())
}
