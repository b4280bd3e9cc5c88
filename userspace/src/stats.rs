//! Per-worker statistics: cache-line-aligned records written by one worker, read lock-free by anyone.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request was dropped or a connection closed. Every drop is counted under exactly one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// A counter request that is not exactly 16 bytes (datagram) or a stream that ended mid-frame.
    WrongLength,
    /// A 16-byte counter frame whose hash does not match its value.
    BadHash,
    /// A sockperf datagram shorter than the 14-byte header, or a stream message declaring such a length.
    TooShort,
    /// A datagram larger than the receive buffer (cut by the kernel: MSG_TRUNC).
    Oversize,
    /// A frame whose IP or UDP length runs past its end (dropped in XDP).
    Truncated,
    /// The first fragment of a fragmented datagram (dropped in XDP).
    Fragment,
    /// A UDP datagram from source port 0: no reply can be addressed to it (sendto refuses port 0).
    ZeroSourcePort,
    /// A frame on an AF_XDP ring that is not one whole Ethernet/IP/UDP datagram for a listener.
    Malformed,
    /// An AF_XDP RX descriptor whose bytes lie outside the UMEM.
    BadDescriptor,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::WrongLength,
        DropReason::BadHash,
        DropReason::TooShort,
        DropReason::Oversize,
        DropReason::Truncated,
        DropReason::Fragment,
        DropReason::ZeroSourcePort,
        DropReason::Malformed,
        DropReason::BadDescriptor,
    ];
    pub const COUNT: usize = Self::ALL.len();

    pub const fn index(self) -> usize {
        self as usize
    }

    /// The label used in logs, JSON and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::WrongLength => "wrong_length",
            DropReason::BadHash => "bad_hash",
            DropReason::TooShort => "too_short",
            DropReason::Oversize => "oversize",
            DropReason::Truncated => "truncated",
            DropReason::Fragment => "fragment",
            DropReason::ZeroSourcePort => "zero_source_port",
            DropReason::Malformed => "malformed",
            DropReason::BadDescriptor => "bad_descriptor",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One monotonically increasing counter with a single writer.
///
/// The owning worker adds with a relaxed load and store, which compiles to plain moves: no locked
/// read-modify-write on the hot path. Any thread may read it at any time and sees a value that was
/// current at some recent point.
#[derive(Debug, Default)]
pub struct Tally(AtomicU64);

impl Tally {
    /// Adds `n`. Only the record's owner calls this.
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The statistics of one worker, alone on its cache lines so workers never share a line.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct WorkerStats {
    /// Requests received: datagrams, stream frames (counter, sockperf) or stream reads (echo).
    pub requests: Tally,
    /// Replies handed to the kernel.
    pub replies: Tally,
    pub rx_bytes: Tally,
    pub tx_bytes: Tally,
    drops: [Tally; DropReason::COUNT],
    /// Replies the kernel refused (send errors other than would-block); the request was counted.
    pub tx_errors: Tally,
    /// Stream connections accepted and closed.
    pub conns_opened: Tally,
    pub conns_closed: Tally,
    /// Stream connections closed because of an invalid frame.
    pub conns_rejected: Tally,
    /// Connections accepted and closed at once because the process was out of file descriptors.
    pub conns_refused: Tally,
    /// TCP-lite (the bypass datapaths' TCP): the connection statistics of [`TcpLiteStats`].
    pub tcp: TcpLiteTallies,
}

/// TCP-lite's own counts, written by the worker that owns the connection table.
#[derive(Debug, Default)]
pub struct TcpLiteTallies {
    /// Third ACKs whose SYN cookie checked out: connections created.
    pub handshakes: Tally,
    /// ACK segments for no known connection whose cookie did not check out (never answered).
    pub cookie_failures: Tally,
    /// Segments carrying request bytes that had already been received (answered from the replies
    /// not yet acknowledged, never counted again).
    pub retransmitted: Tally,
    /// Segments that started beyond the next expected byte (dropped, answered with a duplicate ACK).
    pub out_of_order: Tally,
    /// RST segments sent.
    pub resets_sent: Tally,
    /// Handshakes refused (RST) because the connection table was full.
    pub table_full: Tally,
    /// Connections forgotten after `--tcp-idle-timeout` without a segment.
    pub idle_closed: Tally,
}

impl TcpLiteTallies {
    fn snapshot(&self) -> TcpLiteStats {
        TcpLiteStats {
            handshakes: self.handshakes.get(),
            cookie_failures: self.cookie_failures.get(),
            retransmitted: self.retransmitted.get(),
            out_of_order: self.out_of_order.get(),
            resets_sent: self.resets_sent.get(),
            table_full: self.table_full.get(),
            idle_closed: self.idle_closed.get(),
        }
    }
}

/// A plain copy of [`TcpLiteTallies`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpLiteStats {
    pub handshakes: u64,
    pub cookie_failures: u64,
    pub retransmitted: u64,
    pub out_of_order: u64,
    pub resets_sent: u64,
    pub table_full: u64,
    pub idle_closed: u64,
}

impl TcpLiteStats {
    fn merge(&mut self, o: &TcpLiteStats) {
        self.handshakes += o.handshakes;
        self.cookie_failures += o.cookie_failures;
        self.retransmitted += o.retransmitted;
        self.out_of_order += o.out_of_order;
        self.resets_sent += o.resets_sent;
        self.table_full += o.table_full;
        self.idle_closed += o.idle_closed;
    }

    fn fields(&self) -> [Field; 7] {
        [
            Field::counter(
                "tcp_handshakes",
                "TCP-lite handshakes completed (valid SYN cookie)",
                self.handshakes,
            ),
            Field::counter(
                "tcp_cookie_failures",
                "TCP-lite segments for no connection whose SYN cookie failed (never answered)",
                self.cookie_failures,
            ),
            Field::counter(
                "tcp_retransmitted",
                "TCP-lite segments repeating request bytes already received (never counted twice)",
                self.retransmitted,
            ),
            Field::counter(
                "tcp_out_of_order",
                "TCP-lite segments beyond the next expected byte (dropped, duplicate ACK sent)",
                self.out_of_order,
            ),
            Field::counter(
                "tcp_resets_sent",
                "TCP-lite RST segments sent",
                self.resets_sent,
            ),
            Field::counter(
                "tcp_table_full",
                "TCP-lite handshakes refused because the connection table was full",
                self.table_full,
            ),
            Field::counter(
                "tcp_idle_closed",
                "TCP-lite connections forgotten after the idle timeout",
                self.idle_closed,
            ),
        ]
    }
}

impl WorkerStats {
    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason.index()].add(1);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].get()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut drops = [0u64; DropReason::COUNT];
        for reason in DropReason::ALL {
            drops[reason.index()] = self.drops(reason);
        }
        StatsSnapshot {
            requests: self.requests.get(),
            replies: self.replies.get(),
            rx_bytes: self.rx_bytes.get(),
            tx_bytes: self.tx_bytes.get(),
            drops,
            tx_errors: self.tx_errors.get(),
            conns_opened: self.conns_opened.get(),
            conns_closed: self.conns_closed.get(),
            conns_rejected: self.conns_rejected.get(),
            conns_refused: self.conns_refused.get(),
            tcp: self.tcp.snapshot(),
        }
    }
}

/// A plain copy of a worker's statistics, summable across workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub replies: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub drops: [u64; DropReason::COUNT],
    pub tx_errors: u64,
    pub conns_opened: u64,
    pub conns_closed: u64,
    pub conns_rejected: u64,
    pub conns_refused: u64,
    pub tcp: TcpLiteStats,
}

/// Whether a statistic is a monotonic counter or an instantaneous value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Counter,
    Gauge,
}

/// One statistic of a record, described once: its name (in the exit report, `/metrics` and
/// `/stats`), its help text, its kind and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: FieldKind,
    pub value: u64,
}

impl Field {
    const fn counter(name: &'static str, help: &'static str, value: u64) -> Field {
        Field {
            name,
            help,
            kind: FieldKind::Counter,
            value,
        }
    }
}

impl StatsSnapshot {
    /// Every statistic of the record except the drops (see [`StatsSnapshot::drops`]), in report
    /// order. The exit report, `/metrics` and `/stats` all render from this list.
    pub fn fields(&self) -> [Field; 17] {
        let [a, b, c, d, e, f, g] = self.tcp.fields();
        [
            Field::counter("requests", "Requests received", self.requests),
            Field::counter("replies", "Replies sent", self.replies),
            Field::counter("rx_bytes", "Request payload bytes received", self.rx_bytes),
            Field::counter("tx_bytes", "Reply payload bytes sent", self.tx_bytes),
            Field::counter("tx_errors", "Replies the kernel refused", self.tx_errors),
            Field::counter(
                "conns_opened",
                "Stream connections accepted",
                self.conns_opened,
            ),
            Field::counter(
                "conns_closed",
                "Stream connections closed",
                self.conns_closed,
            ),
            Field::counter(
                "conns_rejected",
                "Stream connections closed after an invalid frame",
                self.conns_rejected,
            ),
            Field::counter(
                "conns_refused",
                "Connections refused because the process was out of file descriptors",
                self.conns_refused,
            ),
            Field {
                name: "conns_open",
                help: "Stream connections open now",
                kind: FieldKind::Gauge,
                value: self.conns_opened.saturating_sub(self.conns_closed),
            },
            a,
            b,
            c,
            d,
            e,
            f,
            g,
        ]
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub fn merge(&mut self, other: &StatsSnapshot) {
        self.requests += other.requests;
        self.replies += other.replies;
        self.rx_bytes += other.rx_bytes;
        self.tx_bytes += other.tx_bytes;
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
        self.tx_errors += other.tx_errors;
        self.conns_opened += other.conns_opened;
        self.conns_closed += other.conns_closed;
        self.conns_rejected += other.conns_rejected;
        self.conns_refused += other.conns_refused;
        self.tcp.merge(&other.tcp);
    }
}

impl StatsSnapshot {
    /// Counts requests an XDP program handled itself: `replies` answered, `drops` dropped by reason.
    pub fn add_in_kernel(&mut self, replies: u64, drops: &[(DropReason, u64)]) {
        self.requests += replies;
        self.replies += replies;
        for &(reason, n) in drops {
            self.requests += n;
            self.drops[reason.index()] += n;
        }
    }

    /// Counts the connections an XDP program's TCP-lite opened (`tcp.handshakes`), closed and
    /// rejected, with its TCP-lite counts.
    pub fn add_in_kernel_tcp(&mut self, tcp: &TcpLiteStats, closed: u64, rejected: u64) {
        self.conns_opened += tcp.handshakes;
        self.conns_closed += closed;
        self.conns_rejected += rejected;
        self.tcp.merge(tcp);
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_fields(f, &self.fields())?;
        for reason in DropReason::ALL {
            write!(f, " drop_{}={}", reason, self.drops(reason))?;
        }
        Ok(())
    }
}

/// XDP_STATISTICS of one AF_XDP socket (`struct xdp_statistics`, the kernel's own counts of what
/// it could not hand to or take from the rings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct XskStats {
    pub rx_dropped: u64,
    pub rx_ring_full: u64,
    pub fill_ring_empty_descs: u64,
    pub tx_invalid_descs: u64,
    pub tx_ring_empty_descs: u64,
}

impl XskStats {
    pub const COUNT: usize = 5;

    /// Every statistic of the record, described once: the exit report, `/metrics` (prefixed
    /// `xsk_`) and `/stats` render from this list.
    pub fn fields(&self) -> [Field; XskStats::COUNT] {
        [
            Field::counter(
                "rx_dropped",
                "Frames the kernel dropped for this AF_XDP socket (XDP_STATISTICS)",
                self.rx_dropped,
            ),
            Field::counter(
                "rx_ring_full",
                "Frames dropped because the AF_XDP RX ring was full",
                self.rx_ring_full,
            ),
            Field::counter(
                "fill_ring_empty_descs",
                "Times the kernel found the AF_XDP fill ring empty",
                self.fill_ring_empty_descs,
            ),
            Field::counter(
                "tx_invalid_descs",
                "AF_XDP TX descriptors the kernel refused as invalid",
                self.tx_invalid_descs,
            ),
            Field::counter(
                "tx_ring_empty_descs",
                "Times the kernel found the AF_XDP TX ring empty when kicked",
                self.tx_ring_empty_descs,
            ),
        ]
    }

    fn from_values(v: [u64; XskStats::COUNT]) -> XskStats {
        XskStats {
            rx_dropped: v[0],
            rx_ring_full: v[1],
            fill_ring_empty_descs: v[2],
            tx_invalid_descs: v[3],
            tx_ring_empty_descs: v[4],
        }
    }
}

impl fmt::Display for XskStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_fields(f, &self.fields())
    }
}

/// Writes `name=value` pairs separated by spaces.
fn write_fields(f: &mut fmt::Formatter<'_>, fields: &[Field]) -> fmt::Result {
    for (i, field) in fields.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        write!(f, "{sep}{}={}", field.name, field.value)?;
    }
    Ok(())
}

/// XDP_STATISTICS of one AF_XDP socket as its worker last published them, and when. The worker
/// publishes on a wall-clock deadline (see `afxdp::worker::PUBLISH_INTERVAL`), whatever its poll mode.
#[derive(Debug)]
pub struct XskLive {
    /// The values of [`XskStats::fields`], in that order.
    values: [AtomicU64; XskStats::COUNT],
    /// Nanoseconds from `created` to the last publication; u64::MAX before the first.
    published_ns: AtomicU64,
    created: std::time::Instant,
}

impl Default for XskLive {
    fn default() -> XskLive {
        XskLive {
            values: Default::default(),
            published_ns: AtomicU64::new(u64::MAX),
            created: std::time::Instant::now(),
        }
    }
}

impl XskLive {
    /// The values last published.
    pub fn snapshot(&self) -> XskStats {
        XskStats::from_values(std::array::from_fn(|i| {
            self.values[i].load(Ordering::Relaxed)
        }))
    }

    /// Publishes fresh values (only the owning worker calls this) and records when.
    pub fn publish(&self, stats: &XskStats) {
        for (cell, field) in self.values.iter().zip(stats.fields()) {
            cell.store(field.value, Ordering::Relaxed);
        }
        let ns = self
            .created
            .elapsed()
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64;
        self.published_ns.store(ns, Ordering::Release);
    }

    /// How old the published values are; None before the first publication.
    pub fn age(&self) -> Option<std::time::Duration> {
        let ns = self.published_ns.load(Ordering::Acquire);
        (ns != u64::MAX).then(|| {
            self.created
                .elapsed()
                .saturating_sub(std::time::Duration::from_nanos(ns))
        })
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn records_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<WorkerStats>(), 64);
        assert_eq!(std::mem::size_of::<WorkerStats>() % 64, 0);
    }

    #[test]
    fn xsk_values_round_trip_through_the_live_record_in_field_order() {
        let stats = XskStats {
            rx_dropped: 1,
            rx_ring_full: 2,
            fill_ring_empty_descs: 3,
            tx_invalid_descs: 4,
            tx_ring_empty_descs: 5,
        };
        let live = XskLive::default();
        assert_eq!(live.age(), None);
        live.publish(&stats);
        assert_eq!(live.snapshot(), stats);
        assert!(live.age().is_some());
        assert_eq!(
            stats.to_string(),
            "rx_dropped=1 rx_ring_full=2 fill_ring_empty_descs=3 tx_invalid_descs=4 tx_ring_empty_descs=5"
        );
    }

    #[test]
    fn snapshot_and_merge() {
        let stats = WorkerStats::default();
        stats.requests.add(3);
        stats.count_drop(DropReason::BadHash);
        stats.count_drop(DropReason::BadHash);
        let mut total = stats.snapshot();
        total.merge(&stats.snapshot());
        assert_eq!(total.requests, 6);
        assert_eq!(total.drops(DropReason::BadHash), 4);
        assert_eq!(total.total_drops(), 4);
    }
}
