//! One AF_XDP worker: one socket bound to one RX queue, its own UMEM and rings, pinned to one CPU.
//!
//! Per turn it reaps TX completions, refills the fill ring, takes a batch from the RX ring, lets the
//! core verify and answer it (one counter add per batch), turns each answered frame into its reply in
//! place and puts the batch on the TX ring, kicking the kernel only when need_wakeup asks.

use std::ffi::CString;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, UmemConfig, User};

use super::frame::{classify, Listeners, UdpFrame, Verdict};
use super::umem::UmemArea;
use crate::core::{Batch, Counter, Ticket};
use crate::spec::{PollMode, ZeroCopy};
use crate::stats::{DropReason, WorkerStats, XskLive, XskStats};
use crate::sys;

/// Sizes and behaviour of one AF_XDP socket.
#[derive(Debug, Clone)]
pub struct SocketParams {
    pub iface: String,
    pub frame_size: u32,
    pub frame_count: u32,
    pub ring_size: u32,
    pub zero_copy: ZeroCopy,
    pub huge_pages: bool,
    pub busy_poll_usecs: Option<u32>,
    pub busy_poll_budget: Option<u32>,
    pub poll: PollMode,
    pub batch: u32,
    /// SCHED_FIFO priority for the worker thread (`--sched-fifo`).
    pub fifo_priority: Option<i32>,
}

/// An open socket with its rings. Field order is drop order: rings before the UMEM area.
struct Rings {
    rx: RingRx,
    tx: RingTx,
    device: DeviceQueue,
    user: User,
    _socket: Socket,
    area: UmemArea,
    zero_copy: bool,
}

fn errno(e: xdpilone::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.get_raw().abs())
}

fn open(params: &SocketParams, queue: u32, zero_copy: bool) -> Result<Rings> {
    let config = UmemConfig {
        fill_size: params.ring_size,
        complete_size: params.ring_size,
        frame_size: params.frame_size,
        headroom: 0,
        flags: 0,
    };
    let area = UmemArea::new(config, params.frame_count, params.huge_pages).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EPERM) {
            anyhow!(e).context("cannot register the UMEM: it needs root or CAP_IPC_LOCK (locked memory), or a smaller --frame-count")
        } else {
            anyhow!(e).context("cannot create the UMEM")
        }
    })?;
    let mut info = IfInfo::invalid();
    let name = CString::new(params.iface.as_str())?;
    info.from_name(&name)
        .map_err(errno)
        .with_context(|| format!("no interface '{}'", params.iface))?;
    info.set_queue(queue);
    let socket = Socket::with_shared(&info, area.umem())
        .map_err(errno)
        .context("cannot create an AF_XDP socket")?;
    let device = area
        .umem()
        .fq_cq(&socket)
        .map_err(errno)
        .context("cannot map the fill and completion rings")?;
    let mut bind_flags = SocketConfig::XDP_BIND_NEED_WAKEUP;
    bind_flags |= if zero_copy {
        SocketConfig::XDP_BIND_ZEROCOPY
    } else {
        SocketConfig::XDP_BIND_COPY
    };
    let user = area
        .umem()
        .rx_tx(
            &socket,
            &SocketConfig {
                rx_size: NonZeroU32::new(params.ring_size),
                tx_size: NonZeroU32::new(params.ring_size),
                bind_flags,
            },
        )
        .map_err(errno)
        .context("cannot configure the RX and TX rings")?;
    let rx = user
        .map_rx()
        .map_err(errno)
        .context("cannot map the RX ring")?;
    let tx = user
        .map_tx()
        .map_err(errno)
        .context("cannot map the TX ring")?;
    area.umem().bind(&user).map_err(errno).with_context(|| {
        format!(
            "cannot bind an AF_XDP socket to {} queue {queue}{}",
            params.iface,
            if zero_copy { " in zero-copy mode" } else { "" }
        )
    })?;
    Ok(Rings {
        rx,
        tx,
        device,
        user,
        _socket: socket,
        area,
        zero_copy,
    })
}

/// Opens the socket, trying zero-copy first when `auto`; says once when it falls back.
fn open_with_fallback(params: &SocketParams, queue: u32) -> Result<Rings> {
    match params.zero_copy {
        ZeroCopy::On => open(params, queue, true),
        ZeroCopy::Off => open(params, queue, false),
        ZeroCopy::Auto => match open(params, queue, true) {
            Ok(rings) => Ok(rings),
            Err(e) => {
                if queue == 0 {
                    tracing::warn!(
                        "{}: zero-copy refused ({e:#}); using copy mode",
                        params.iface
                    );
                }
                open(params, queue, false)
            }
        },
    }
}

/// What a worker reports when it starts: its socket for the XSKMAP and whether it got zero-copy.
pub struct Started {
    pub fd: i32,
    pub zero_copy: bool,
}

/// Runs one AF_XDP worker until `stop`. Sends `Started` (or the start-up error) once the socket is bound.
#[allow(clippy::too_many_arguments)]
pub fn run(
    params: SocketParams,
    queue: u32,
    listeners: Arc<Listeners>,
    stats: Arc<WorkerStats>,
    counter: Arc<dyn Counter>,
    stop: Arc<AtomicBool>,
    started: std::sync::mpsc::Sender<Result<Started>>,
    live: Arc<XskLive>,
) -> Result<XskStats> {
    let opened = open_with_fallback(&params, queue).and_then(|rings| {
        if let Some(usecs) = params.busy_poll_usecs {
            sys::set_busy_poll(rings.rx.as_raw_fd(), usecs, params.busy_poll_budget)
                .context("cannot enable busy polling on the AF_XDP socket")?;
        }
        Ok(rings)
    });
    // Start-up waits for this message: every failure before it says why.
    let mut rings = match opened {
        Ok(r) => r,
        Err(e) => {
            let message = format!("{e:#}");
            let _ = started.send(Err(e));
            return Err(anyhow!(message));
        }
    };
    let fd = rings.rx.as_raw_fd();
    let _ = started.send(Ok(Started {
        fd,
        zero_copy: rings.zero_copy,
    }));

    let frame_size = params.frame_size as u64;
    // Every frame is in exactly one place: the free list, the fill ring, the RX ring, the TX ring or
    // the completion ring. Start with as many on the fill ring as it takes.
    let mut free: Vec<u64> = (0..params.frame_count as u64)
        .map(|i| i * frame_size)
        .collect();
    let batch = params.batch.min(params.ring_size);
    let mut descs: Vec<XdpDesc> = Vec::with_capacity(batch as usize);
    let mut tickets: Vec<Ticket> = Vec::with_capacity(batch as usize);
    let mut located: Vec<Option<UdpFrame>> = Vec::with_capacity(batch as usize);
    let mut replies: Vec<XdpDesc> = Vec::with_capacity(batch as usize);
    // Reply payload bytes per queued reply, so tx_bytes counts payloads as rx_bytes does.
    let mut reply_payloads: Vec<u16> = Vec::with_capacity(batch as usize);
    let spin = params.poll == PollMode::Spin;
    let mut publish_due = Every::new(PUBLISH_INTERVAL);

    while !stop.load(Ordering::Relaxed) {
        // On a wall-clock deadline, whatever the poll mode: XDP_STATISTICS for the endpoints.
        if publish_due.check(Instant::now()) {
            if let Ok(x) = rings.user.statistics_v2() {
                publish(&live, &x);
            }
        }
        // Completions: transmitted frames come back to the free list.
        {
            let mut reader = rings.device.complete(rings.device.available());
            while let Some(addr) = reader.read() {
                free.push(addr);
            }
            reader.release();
        }
        // Refill.
        if !free.is_empty() {
            let mut writer = rings.device.fill(free.len() as u32);
            let n = writer.capacity() as usize;
            let start = free.len() - n;
            writer.insert(free[start..].iter().copied());
            writer.commit();
            drop(writer);
            free.truncate(start);
            if rings.device.needs_wakeup() {
                rings.device.wake();
            }
        }

        // Receive a batch.
        descs.clear();
        {
            let mut reader = rings.rx.receive(batch);
            while let Some(desc) = reader.read() {
                descs.push(desc);
            }
            reader.release();
        }
        if descs.is_empty() {
            if !spin {
                sys::wait_readable(fd, POLL_INTERVAL.as_millis() as i32);
            } else if rings.tx.needs_wakeup() && rings.tx.pending() > 0 {
                rings.tx.wake();
            }
            continue;
        }

        // Verify and count with the shared core, one counter add for the batch.
        let mut core_batch = Batch::new(&stats);
        tickets.clear();
        located.clear();
        for desc in &descs {
            let frame = rings.area.bytes_mut(desc.addr, desc.len);
            let (ticket, loc) = admit_frame(&mut core_batch, frame, &listeners);
            tickets.push(ticket);
            located.push(loc);
        }
        let commit = core_batch.commit(&*counter);

        // Replies in place, drops straight back to the free list.
        replies.clear();
        reply_payloads.clear();
        for ((desc, ticket), loc) in descs.iter().zip(&tickets).zip(&located) {
            let (Some(loc), true) = (loc, ticket.is_reply()) else {
                free.push(desc.addr);
                continue;
            };
            let frame = rings
                .area
                .bytes_mut(desc.addr, desc.len)
                .expect("checked above");
            let payload = &mut frame[loc.payload_offset..loc.payload_offset + loc.payload_len];
            let reply_len = commit.write_reply_in_place(*ticket, payload);
            let frame_len = loc.into_reply(frame, reply_len);
            reply_payloads.push(reply_len as u16);
            replies.push(XdpDesc {
                addr: desc.addr,
                len: frame_len as u32,
                options: 0,
            });
        }
        if !replies.is_empty() {
            let sent = transmit(&mut rings, &replies, &mut free);
            let bytes: u64 = reply_payloads[..sent].iter().map(|&n| u64::from(n)).sum();
            stats.replies.add(sent as u64);
            stats.tx_bytes.add(bytes);
            if sent < replies.len() {
                // The kernel took nothing for many kicks: count these replies lost, reuse frames.
                stats.tx_errors.add((replies.len() - sent) as u64);
                free.extend(replies[sent..].iter().map(|d| d.addr));
            }
        }
    }

    let xdp = rings
        .user
        .statistics_v2()
        .map_err(errno)
        .context("XDP_STATISTICS")?;
    Ok(xsk_stats(&xdp))
}

/// Takes one RX descriptor to exactly one counted outcome: admitted to the core (answered or dropped
/// by it), or rejected before it for a reason of its own. The frame is classified by the same rules
/// as the steering program (`frame::classify`), so the worker drops for the reasons the program
/// would; a frame the program would not have steered here is `malformed`. `frame` is None when the
/// descriptor points outside the UMEM.
fn admit_frame(
    batch: &mut Batch,
    frame: Option<&mut [u8]>,
    listeners: &Listeners,
) -> (Ticket, Option<UdpFrame>) {
    let Some(frame) = frame else {
        // A descriptor outside the UMEM: no bytes can be read, none are counted.
        return (batch.reject(DropReason::BadDescriptor, 0), None);
    };
    // rx_bytes counts payload bytes on every datapath: what the frame holds of the UDP payload, none
    // for a frame that is not a datagram for a listener.
    match classify(frame, listeners) {
        Verdict::Pass => (batch.reject(DropReason::Malformed, 0), None),
        Verdict::Drop(reason) => {
            let payload = UdpFrame::locate(frame).map_or(0, |udp| udp.payload_len);
            (batch.reject(reason, payload), None)
        }
        Verdict::Request {
            frame: udp,
            protocol,
        } => {
            let payload = &frame[udp.payload_offset..udp.payload_offset + udp.payload_len];
            (batch.admit(protocol, payload), Some(udp))
        }
    }
}

fn xsk_stats(x: &xdpilone::xdp::XdpStatisticsV2) -> XskStats {
    XskStats {
        rx_dropped: x.rx_dropped,
        rx_ring_full: x.rx_ring_full,
        fill_ring_empty_descs: x.rx_fill_ring_empty_descs,
        tx_invalid_descs: x.tx_invalid_descs,
        tx_ring_empty_descs: x.tx_ring_empty_descs,
    }
}

fn publish(live: &XskLive, x: &xdpilone::xdp::XdpStatisticsV2) {
    live.publish(&xsk_stats(x));
}

/// How often a worker refreshes its XDP_STATISTICS for the endpoints. Each refresh is one
/// getsockopt, so 10 per second cost nothing measurable, and `/metrics` is never more than this plus
/// one poll interval (`POLL_INTERVAL`, for a blocking worker) out of date.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

/// A wall-clock deadline that recurs every `interval`: `check` is true once per interval.
#[derive(Debug, Clone, Copy)]
pub struct Every {
    interval: Duration,
    next: Option<Instant>,
}

impl Every {
    /// Due at the first check, then every `interval`.
    pub const fn new(interval: Duration) -> Every {
        Every {
            interval,
            next: None,
        }
    }

    /// True when the deadline has passed (and arms the next one).
    pub fn check(&mut self, now: Instant) -> bool {
        if self.next.is_some_and(|next| now < next) {
            return false;
        }
        self.next = Some(now + self.interval);
        true
    }
}

/// Copy-mode sockets transmit at most this many descriptors per kick (the kernel's TX_BATCH_SIZE).
const COPY_MODE_TX_PER_KICK: u32 = 32;
/// Kicks to try while the TX ring stays full before counting replies as lost.
const MAX_FULL_RING_KICKS: u32 = 64;

/// Puts replies on the TX ring and kicks the kernel when need_wakeup asks. In copy mode a kick sends
/// at most 32 frames, so kick until the ring is drained; when the ring is full, reap completions and
/// kick until there is room. Returns how many replies went on the ring.
fn transmit(rings: &mut Rings, replies: &[XdpDesc], free: &mut Vec<u64>) -> usize {
    let mut sent = 0;
    let mut full_kicks = 0;
    while sent < replies.len() {
        let mut writer = rings.tx.transmit((replies.len() - sent) as u32);
        let n = writer.insert(replies[sent..].iter().copied()) as usize;
        writer.commit();
        drop(writer);
        sent += n;
        if sent < replies.len() {
            if full_kicks == MAX_FULL_RING_KICKS {
                break;
            }
            full_kicks += 1;
            rings.tx.wake();
            let mut reader = rings.device.complete(rings.device.available());
            while let Some(addr) = reader.read() {
                free.push(addr);
            }
            reader.release();
        }
    }
    if rings.tx.needs_wakeup() {
        if rings.zero_copy {
            rings.tx.wake();
        } else {
            // Copy mode transmits synchronously inside the kick: repeat until the ring is empty.
            let kicks = rings.tx.pending().div_ceil(COPY_MODE_TX_PER_KICK) + 1;
            for _ in 0..kicks {
                if rings.tx.pending() == 0 {
                    break;
                }
                rings.tx.wake();
            }
        }
    }
    sent
}

/// How long a blocking worker sleeps in poll() before looking at the stop flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod test {
    use super::*;
    use crate::core::Protocol;
    use crate::wire::CounterRepr;
    use etherparse::PacketBuilder;

    fn udp_frame(source_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .udp(source_port, 7777)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    #[test]
    fn every_descriptor_ends_in_exactly_one_counted_outcome() {
        let listeners = Listeners::new(&[("198.18.0.1:7777".parse().unwrap(), Protocol::Counter)]);
        let valid = CounterRepr { value: 4 }.to_bytes();
        let mut tcp = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .tcp(40000, 7777, 1, 1000)
            .write(&mut tcp, &valid)
            .unwrap();
        let mut cases: Vec<(Option<Vec<u8>>, Option<DropReason>)> = vec![
            (Some(udp_frame(40000, &valid)), None),
            (None, Some(DropReason::BadDescriptor)),
            (Some(tcp), Some(DropReason::Malformed)),
            (Some(vec![0u8; 10]), Some(DropReason::Malformed)),
            (Some(udp_frame(0, &valid)), Some(DropReason::ZeroSourcePort)),
            (
                Some(udp_frame(40000, &valid[..15])),
                Some(DropReason::WrongLength),
            ),
            (
                Some(udp_frame(40000, b"aaaaaaaaaaaaaaaa")),
                Some(DropReason::BadHash),
            ),
        ];
        let stats = WorkerStats::default();
        let mut batch = Batch::new(&stats);
        for (i, (frame, expected)) in cases.iter_mut().enumerate() {
            let before = stats.snapshot();
            let (ticket, located) = admit_frame(&mut batch, frame.as_deref_mut(), &listeners);
            let after = stats.snapshot();
            assert_eq!(after.requests, before.requests + 1, "case {i}: one request");
            assert_eq!(
                after.total_drops() - before.total_drops(),
                u64::from(expected.is_some()),
                "case {i}: at most one drop"
            );
            match expected {
                Some(reason) => {
                    assert_eq!(ticket, Ticket::Drop(*reason), "case {i}");
                    assert_eq!(after.drops(*reason), before.drops(*reason) + 1, "case {i}");
                    assert!(!ticket.is_reply(), "case {i}: a drop is never answered");
                }
                None => assert!(ticket.is_reply() && located.is_some(), "case {i}"),
            }
        }
    }

    #[test]
    fn every_is_due_at_once_then_once_per_interval() {
        let t0 = Instant::now();
        let mut every = Every::new(Duration::from_millis(100));
        assert!(every.check(t0));
        assert!(!every.check(t0 + Duration::from_millis(99)));
        assert!(every.check(t0 + Duration::from_millis(100)));
        assert!(!every.check(t0 + Duration::from_millis(150)));
        // A worker that slept through several intervals publishes once, then re-arms from now.
        assert!(every.check(t0 + Duration::from_secs(5)));
        assert!(!every.check(t0 + Duration::from_millis(5050)));
    }
}
