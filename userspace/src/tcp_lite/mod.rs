//! TCP-lite, sans-IO: enough TCP for any real client of a request/response protocol whose replies
//! are never longer than its requests, and nothing more. Segments in, segments out; no clock of its
//! own (the caller passes seconds), no timer, no allocation after [`TcpLite::new`].
//!
//! - Handshake with SYN cookies ([`cookie`]): a SYN is answered with a SYN-ACK and leaves no state;
//!   the connection is created by the first ACK whose cookie checks out (the third ACK, or the first
//!   data segment if that ACK was lost). A retransmitted SYN gets the same SYN-ACK again. The
//!   SYN-ACK offers an MSS that is a multiple of 16 and no window scaling, SACK or timestamps, so
//!   the client turns them off.
//! - Data in order is fed to the shared core's stream decoder (frames split at any byte, pipelined
//!   frames in order); its replies wait in the connection's reply buffer ([`conn::OUT_CAP`] bytes)
//!   until the client acknowledges them, and the advertised window is the room left there. Bytes
//!   already received are never fed again; segments beyond the next expected byte are dropped and
//!   answered with a duplicate ACK, so the core never sees data out of order.
//! - Every segment the server sends carries the acknowledgement of all received and every
//!   unacknowledged reply byte that fits, from the oldest: a lost reply is repeated when the client
//!   retransmits its request, sends a duplicate ACK or a keepalive probe, or sends its next request.
//! - FIN is acknowledged and answered with FIN after the last reply; RST (at the expected sequence
//!   number) forgets the connection, an RST or SYN elsewhere in the window gets a challenge ACK
//!   (RFC 5961). An invalid frame: the replies before it, then FIN; more data is reset.
//! - Data for no connection whose cookie fails (no handshake, a forgotten connection, or a flow that
//!   moved to another worker, whose cookie secret differs) never reaches the core and is answered
//!   with RST, as Linux answers a segment for a closed port.
//! - At most `max_conns` connections: a handshake beyond that is refused with RST and counted;
//!   connections silent for `idle_timeout` seconds are forgotten by [`TcpLite::expire`].

pub mod conn;
pub mod cookie;

use std::collections::HashMap;

use conn::{before, Conn, Step, MAX_WINDOW};
pub use cookie::Cookies;

use crate::core::{Counter, Protocol};
use crate::stats::WorkerStats;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The MSS a client that sends none is assumed to accept (RFC 9293).
const DEFAULT_MSS: u16 = 536;

/// A connection's addresses and ports, as the client sends them. IPv4 addresses fill the first four
/// bytes of each address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub ipv6: bool,
}

/// A received segment, already parsed and checked to lie within its frame.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub flow: Flow,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// The MSS option, if the segment carries one.
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

/// A segment to send back to the client on the same flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing<'a> {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// An MSS option (SYN-ACK only).
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

/// The limits of one connection table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLimits {
    pub max_conns: usize,
    /// Seconds without a segment after which a connection is forgotten.
    pub idle_timeout: u32,
    /// The largest MSS the datapath can carry (its frame size less the headers).
    pub max_mss: u16,
}

/// The connections of one worker (or one program) and the cookie secret.
#[derive(Debug)]
pub struct TcpLite {
    limits: TcpLimits,
    cookies: Cookies,
    index: HashMap<Flow, u32>,
    conns: Vec<Conn>,
    free: Vec<u32>,
}

impl TcpLite {
    /// Allocates the whole table up front (its memory is touched as connections come).
    pub fn new(limits: TcpLimits, cookies: Cookies) -> TcpLite {
        TcpLite {
            limits,
            cookies,
            index: HashMap::with_capacity(limits.max_conns),
            conns: Vec::with_capacity(limits.max_conns),
            free: Vec::with_capacity(limits.max_conns),
        }
    }

    /// Connections open.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Takes one segment for a listener of `protocol` at `now` (seconds); returns the segment to
    /// send back, if any.
    pub fn on_segment(
        &mut self,
        seg: &Segment,
        protocol: Protocol,
        now: u32,
        stats: &WorkerStats,
        counter: &dyn Counter,
    ) -> Option<Outgoing<'_>> {
        match self.index.get(&seg.flow) {
            Some(&slot) => self.established(slot, seg, now, stats, counter),
            None => self.unknown(seg, protocol, now, stats, counter),
        }
    }

    /// A segment for no connection: a SYN gets its cookie; an ACK whose cookie checks out creates
    /// the connection; anything else is ignored.
    fn unknown(
        &mut self,
        seg: &Segment,
        protocol: Protocol,
        now: u32,
        stats: &WorkerStats,
        counter: &dyn Counter,
    ) -> Option<Outgoing<'_>> {
        if seg.flags & RST != 0 {
            return None;
        }
        if seg.flags & (SYN | ACK) == SYN {
            return Some(self.syn_ack(seg, now));
        }
        if seg.flags & (SYN | ACK) != ACK {
            return None;
        }
        let client_isn = seg.seq.wrapping_sub(1);
        let cookie = seg.ack.wrapping_sub(1);
        let Some(index) = self.cookies.check(&seg.flow, client_isn, cookie, now) else {
            // No handshake, a forgotten connection, or a flow that moved to another worker: the
            // segment never reaches the core, and RST tells the client at once (as Linux does for
            // a segment to a closed port) instead of letting it retransmit for minutes.
            stats.tcp.cookie_failures.add(1);
            stats.tcp.resets_sent.add(1);
            return Some(reset(seg.ack));
        };
        if self.index.len() >= self.limits.max_conns {
            stats.tcp.table_full.add(1);
            stats.tcp.resets_sent.add(1);
            return Some(reset(seg.ack));
        }
        let mss = cookie::MSS_TABLE[usize::from(index)];
        let conn = Conn::new(protocol, seg.seq, seg.ack, mss, now);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.conns[slot as usize] = conn;
                slot
            }
            None => {
                self.conns.push(conn);
                (self.conns.len() - 1) as u32
            }
        };
        self.index.insert(seg.flow, slot);
        stats.tcp.handshakes.add(1);
        stats.conns_opened.add(1);
        self.established(slot, seg, now, stats, counter)
    }

    fn syn_ack(&self, seg: &Segment, now: u32) -> Outgoing<'static> {
        let mss = seg
            .mss
            .unwrap_or(DEFAULT_MSS)
            .min(self.limits.max_mss)
            .max(1);
        let index = cookie::mss_index(mss);
        Outgoing {
            seq: self.cookies.make(&seg.flow, seg.seq, now, index),
            ack: seg.seq.wrapping_add(1),
            flags: SYN | ACK,
            window: MAX_WINDOW,
            mss: Some(cookie::MSS_TABLE[usize::from(index)]),
            payload: &[],
        }
    }

    fn established(
        &mut self,
        slot: u32,
        seg: &Segment,
        now: u32,
        stats: &WorkerStats,
        counter: &dyn Counter,
    ) -> Option<Outgoing<'_>> {
        let conn = &mut self.conns[slot as usize];
        conn.last_seen = now;
        let step = if seg.flags & RST != 0 {
            if rst_exact(conn, seg.seq) {
                Step::Forget
            } else if in_window(conn, seg.seq) {
                Step::Answer
            } else {
                Step::Quiet
            }
        } else if seg.flags & SYN != 0 {
            // A new connection on a flow still known, or a stale duplicate: challenge ACK. A client
            // that really restarted answers it with RST, which forgets this one.
            Step::Answer
        } else {
            conn.receive(seg, stats, counter)
        };
        match step {
            Step::Answer => Some(self.conns[slot as usize].segment()),
            Step::Quiet => None,
            Step::Forget => {
                self.forget(seg.flow, slot, stats);
                None
            }
            Step::Reset => {
                self.forget(seg.flow, slot, stats);
                stats.tcp.resets_sent.add(1);
                Some(reset(seg.ack))
            }
            Step::AnswerThenForget => {
                // The slot goes to the free list, but it is not reused before the next segment,
                // so the answer may still be built from it.
                self.forget(seg.flow, slot, stats);
                Some(self.conns[slot as usize].segment())
            }
        }
    }

    fn forget(&mut self, flow: Flow, slot: u32, stats: &WorkerStats) {
        self.index.remove(&flow);
        self.free.push(slot);
        stats.conns_closed.add(1);
    }

    /// Forgets every connection silent for longer than the idle timeout.
    pub fn expire(&mut self, now: u32, stats: &WorkerStats) {
        let (conns, free) = (&self.conns, &mut self.free);
        let idle = self.limits.idle_timeout;
        self.index.retain(|_, slot| {
            let keep = now.saturating_sub(conns[*slot as usize].last_seen) <= idle;
            if !keep {
                free.push(*slot);
                stats.conns_closed.add(1);
                stats.tcp.idle_closed.add(1);
            }
            keep
        });
    }
}

/// An RST at `seq` is at the expected sequence number: anywhere from the last acknowledgement
/// sent (which may lie behind `rcv_nxt`, see [`Conn::segment`]) to `rcv_nxt`.
fn rst_exact(conn: &Conn, seq: u32) -> bool {
    !before(seq, conn.ack_sent) && !before(conn.rcv_nxt, seq)
}

/// `seq` lies within the connection's receive window.
fn in_window(conn: &Conn, seq: u32) -> bool {
    !before(seq, conn.rcv_nxt) && before(seq, conn.rcv_nxt.wrapping_add(conn.window() as u32))
}

/// An RST answering a segment that acknowledged `ack` (RFC 9293: its sequence number is that ACK).
fn reset(ack: u32) -> Outgoing<'static> {
    Outgoing {
        seq: ack,
        ack: 0,
        flags: RST,
        window: 0,
        mss: None,
        payload: &[],
    }
}

/// The lab's flow from 198.18.0.2:`port` to 198.18.0.1:7777, for the unit tests.
#[cfg(test)]
fn lab_flow(port: u16) -> Flow {
    let mut client = [0u8; 16];
    client[..4].copy_from_slice(&[198, 18, 0, 2]);
    let mut server = [0u8; 16];
    server[..4].copy_from_slice(&[198, 18, 0, 1]);
    Flow {
        client,
        server,
        client_port: port,
        server_port: 7777,
        ipv6: false,
    }
}

#[cfg(test)]
mod test;
