//! One AF_XDP worker: one socket bound to one RX queue, its own UMEM and rings, pinned to one CPU.
//! This is the I/O shell around three sans-IO parts: the [`FrameEngine`] (parse, look up, answer in
//! place), the [`FrameLedger`] (where every frame is) and the [`TxFlusher`] (when to kick).
//!
//! Per turn it reaps TX completions, refills the fill ring, takes a batch from the RX ring, lets the
//! engine and the core verify and answer it (one counter add per batch), and puts the replies on the
//! TX ring, kicking the kernel only when need_wakeup asks.

use std::ffi::CString;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, UmemConfig, User};

use super::engine::{Admitted, FrameEngine};
use super::flusher::TxFlusher;
use super::ledger::FrameLedger;
use super::umem::UmemArea;
use crate::core::{Batch, Counter};
use crate::privilege::Lockdown;
use crate::spec::{PollMode, ZeroCopy};
use crate::stats::{WorkerStats, XskLive, XskStats};
use crate::sys;

/// Sizes and behaviour of one AF_XDP socket.
#[derive(Debug, Clone, serde::Serialize)]
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

/// The UMEM: `frame_count` frames, registered with the kernel.
fn create_umem(params: &SocketParams) -> Result<UmemArea> {
    let config = UmemConfig {
        fill_size: params.ring_size,
        complete_size: params.ring_size,
        frame_size: params.frame_size,
        headroom: 0,
        flags: 0,
    };
    UmemArea::new(config, params.frame_count, params.huge_pages).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EPERM) {
            anyhow!(e).context("cannot register the UMEM: it needs root or CAP_IPC_LOCK (locked memory), or a smaller --frame-count")
        } else {
            anyhow!(e).context("cannot create the UMEM")
        }
    })
}

/// Opens a socket on `queue` with its own UMEM and maps its four rings.
fn open(params: &SocketParams, queue: u32, zero_copy: bool) -> Result<Rings> {
    let area = create_umem(params)?;
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

/// Everything one worker needs, handed to its thread.
pub struct WorkerContext {
    pub params: SocketParams,
    pub queue: u32,
    pub engine: FrameEngine,
    pub stats: Arc<WorkerStats>,
    pub counter: Arc<dyn Counter>,
    pub stop: Arc<AtomicBool>,
    /// Where the worker publishes its XDP_STATISTICS for the endpoints.
    pub live: Arc<XskLive>,
    /// The privileges the worker drops once its socket is open.
    pub lockdown: Lockdown,
}

/// Runs one AF_XDP worker until `stop`. Sends `Started` (or the start-up error) once the socket is
/// bound; returns the socket's final XDP_STATISTICS.
pub fn run(
    ctx: WorkerContext,
    started: std::sync::mpsc::Sender<Result<Started>>,
) -> Result<XskStats> {
    let opened = open_with_fallback(&ctx.params, ctx.queue).and_then(|rings| {
        if let Some(usecs) = ctx.params.busy_poll_usecs {
            sys::set_busy_poll(rings.rx.as_raw_fd(), usecs, ctx.params.busy_poll_budget)
                .context("cannot enable busy polling on the AF_XDP socket")?;
        }
        ctx.lockdown.enter()?;
        Ok(rings)
    });
    // Start-up waits for this message: every failure before it says why.
    let rings = match opened {
        Ok(r) => r,
        Err(e) => {
            let message = format!("{e:#}");
            let _ = started.send(Err(e));
            return Err(anyhow!(message));
        }
    };
    let _ = started.send(Ok(Started {
        fd: rings.rx.as_raw_fd(),
        zero_copy: rings.zero_copy,
    }));
    let mut worker = Worker::new(ctx, rings);
    worker.serve();
    let xdp = worker.rings.user.statistics_v2().map_err(errno);
    Ok(xsk_stats(&xdp.context("XDP_STATISTICS")?))
}

/// A running worker: its socket, its frames and the batch in hand. Every buffer is allocated here,
/// once; a turn of the loop allocates nothing.
struct Worker {
    ctx: WorkerContext,
    rings: Rings,
    ledger: FrameLedger,
    flusher: TxFlusher,
    batch: u32,
    spin: bool,
    publish_due: Every,
    /// When TCP-lite next forgets idle connections.
    expire_due: Every,
    /// The batch in hand: descriptors, then what became of each.
    descs: Vec<XdpDesc>,
    admitted: Vec<Admitted>,
    replies: Vec<XdpDesc>,
    /// Per queued reply, its payload bytes and the requests it answers, for `tx_bytes` and
    /// `replies` (zero for TCP-lite, which counts as it produces replies).
    reply_counts: Vec<(u16, u8)>,
}

impl Worker {
    fn new(ctx: WorkerContext, rings: Rings) -> Worker {
        let batch = ctx.params.batch.min(ctx.params.ring_size);
        let capacity = batch as usize;
        Worker {
            ledger: FrameLedger::new(ctx.params.frame_count, ctx.params.frame_size),
            flusher: TxFlusher::new(rings.zero_copy),
            spin: ctx.params.poll == PollMode::Spin,
            publish_due: Every::new(PUBLISH_INTERVAL),
            expire_due: Every::new(EXPIRE_INTERVAL),
            descs: Vec::with_capacity(capacity),
            admitted: Vec::with_capacity(capacity),
            replies: Vec::with_capacity(capacity),
            reply_counts: Vec::with_capacity(capacity),
            batch,
            ctx,
            rings,
        }
    }

    fn serve(&mut self) {
        while !self.ctx.stop.load(Ordering::Relaxed) {
            // On a wall-clock deadline, whatever the poll mode: XDP_STATISTICS for the endpoints.
            if self.publish_due.check(Instant::now()) {
                if let Ok(x) = self.rings.user.statistics_v2() {
                    self.ctx.live.publish(&xsk_stats(&x));
                }
            }
            if self.expire_due.check(Instant::now()) {
                let now = self.ctx.engine.now();
                self.ctx.engine.expire(now, &self.ctx.stats);
            }
            self.reap_completions();
            self.refill();
            if self.receive() == 0 {
                self.idle();
                continue;
            }
            self.answer_batch();
            self.transmit();
            // Debug builds (every test) check the frame accounting after each batch.
            debug_assert!(
                self.ledger.balanced(0),
                "a frame was lost or duplicated: {:?}",
                self.ledger.outcomes()
            );
        }
    }

    /// Transmitted frames come back to the free list.
    fn reap_completions(&mut self) {
        let mut reader = self.rings.device.complete(self.rings.device.available());
        while let Some(addr) = reader.read() {
            self.ledger.completed(addr);
        }
        reader.release();
    }

    /// Hands every free frame the fill ring takes to the kernel.
    fn refill(&mut self) {
        if self.ledger.free_count() == 0 {
            return;
        }
        let mut writer = self.rings.device.fill(self.ledger.free_count() as u32);
        let candidates = self.ledger.fill_candidates(writer.capacity() as usize);
        let offered = candidates.len();
        let inserted = writer.insert(candidates.iter().copied()) as usize;
        writer.commit();
        drop(writer);
        self.ledger.filled(offered, inserted);
        if self.rings.device.needs_wakeup() {
            self.rings.device.wake();
        }
    }

    /// Takes a batch from the RX ring; returns its size.
    fn receive(&mut self) -> usize {
        self.descs.clear();
        let mut reader = self.rings.rx.receive(self.batch);
        while let Some(desc) = reader.read() {
            self.descs.push(desc);
        }
        reader.release();
        self.ledger.received(self.descs.len());
        self.descs.len()
    }

    /// Nothing received: a blocking worker sleeps until the socket is readable; a spinning one
    /// kicks the TX ring if the kernel asked for it.
    fn idle(&mut self) {
        if !self.spin {
            sys::wait_readable(self.rings.rx.as_raw_fd(), POLL_INTERVAL.as_millis() as i32);
        } else if self
            .flusher
            .kick_when_idle(self.rings.tx.needs_wakeup(), self.rings.tx.pending())
        {
            self.rings.tx.wake();
        }
    }

    /// Verifies and counts the batch with the shared core (one counter add), then turns every
    /// answered frame into its reply in place; the rest go straight back to the free list.
    fn answer_batch(&mut self) {
        let mut core_batch = Batch::new(&self.ctx.stats);
        let now = self.ctx.engine.now();
        let frame_size = u64::from(self.ctx.params.frame_size);
        self.admitted.clear();
        for desc in &self.descs {
            // The frame from the descriptor to the end of its UMEM frame: a TCP answer may be
            // longer than the segment it answers.
            let room = (frame_size - desc.addr % frame_size) as u32;
            let frame = self.rings.area.bytes_mut(desc.addr, room);
            let admitted = self.ctx.engine.admit(
                &mut core_batch,
                frame,
                desc.len as usize,
                &*self.ctx.counter,
                now,
            );
            self.admitted.push(admitted);
        }
        let commit = core_batch.commit(&*self.ctx.counter);
        self.replies.clear();
        self.reply_counts.clear();
        for (desc, &admitted) in self.descs.iter().zip(&self.admitted) {
            let room = (frame_size - desc.addr % frame_size) as u32;
            let reply = match self.rings.area.bytes_mut(desc.addr, room) {
                Some(frame) => FrameEngine::answer(&commit, admitted, frame, desc.len as usize),
                None => None,
            };
            let Some(reply) = reply else {
                self.ledger.recycle(desc.addr);
                continue;
            };
            self.reply_counts
                .push((reply.payload_len as u16, reply.replies));
            self.replies.push(XdpDesc {
                addr: desc.addr,
                len: reply.frame_len as u32,
                options: 0,
            });
        }
    }

    /// Puts the replies on the TX ring and kicks as the flusher says; replies a stuck ring never
    /// takes count as `tx_errors` and their frames are reused.
    fn transmit(&mut self) {
        if self.replies.is_empty() {
            return;
        }
        let sent = self.queue_replies();
        let stats = &self.ctx.stats;
        let (bytes, replies) = self.reply_counts[..sent]
            .iter()
            .fold((0u64, 0u64), |(b, r), &(n, k)| {
                (b + u64::from(n), r + u64::from(k))
            });
        stats.replies.add(replies);
        stats.tx_bytes.add(bytes);
        if sent < self.replies.len() {
            stats.tx_errors.add((self.replies.len() - sent) as u64);
            self.ledger
                .tx_refused(self.replies[sent..].iter().map(|d| d.addr));
        }
        let kicks = self
            .flusher
            .kicks_after_batch(self.rings.tx.needs_wakeup(), self.rings.tx.pending());
        for _ in 0..kicks {
            if self.rings.tx.pending() == 0 {
                break;
            }
            self.rings.tx.wake();
        }
    }

    /// Writes the replies to the TX ring; while it is full, kicks and reaps completions as long as
    /// the flusher allows. Returns how many went on the ring.
    fn queue_replies(&mut self) -> usize {
        self.flusher.start_batch();
        let mut sent = 0;
        while sent < self.replies.len() {
            let mut writer = self.rings.tx.transmit((self.replies.len() - sent) as u32);
            let n = writer.insert(self.replies[sent..].iter().copied()) as usize;
            writer.commit();
            drop(writer);
            self.ledger.queued_for_tx(n);
            sent += n;
            if sent < self.replies.len() {
                if !self.flusher.retry_full_ring() {
                    break;
                }
                self.rings.tx.wake();
                self.reap_completions();
            }
        }
        sent
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

/// How often TCP-lite looks for connections past their idle timeout (a scan of the table).
const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a blocking worker sleeps in poll() before looking at the stop flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod test {
    use super::*;

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
