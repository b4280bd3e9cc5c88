//! One TCP-lite connection after its handshake: what it has received, the replies the client has
//! not acknowledged yet, and the segment that answers each segment it gets.
//!
//! Every segment the server sends starts at the oldest unacknowledged reply byte and carries as many
//! of them as the client's MSS and window allow, with the acknowledgement of everything received.
//! So a lost reply is repeated by the next segment the server sends for any reason: the client's
//! retransmitted request, its duplicate ACK, its keepalive probe, or its next request. The server
//! needs no timer.

use super::{Outgoing, Segment, ACK, FIN, PSH};
use crate::core::{Counter, Protocol, StreamDecoder};
use crate::stats::{DropReason, WorkerStats};

/// Reply bytes a connection keeps until the client acknowledges them.
pub const OUT_CAP: usize = 1024;
/// Room kept free in the reply buffer beyond the advertised window: a counter frame completed by
/// the next segment answers up to 15 bytes received earlier.
const SLACK: usize = 16;
/// The window a connection advertises when no reply is waiting for its acknowledgement.
pub const MAX_WINDOW: u16 = (OUT_CAP - SLACK) as u16;

/// `a` comes before `b` in sequence space.
pub fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The state of one connection. About 1.1 KiB, most of it the reply buffer.
#[derive(Debug, Clone)]
pub struct Conn {
    pub protocol: Protocol,
    /// The next byte expected from the client.
    pub rcv_nxt: u32,
    /// The oldest reply byte not acknowledged: `out[0]`.
    pub snd_una: u32,
    /// The highest sequence number sent so far, plus one.
    snd_max: u32,
    /// The highest acknowledgement sent: it never moves back (see [`Conn::segment`]).
    pub ack_sent: u32,
    /// The client's MSS (the one the SYN-ACK offered) and its last advertised window.
    mss: u16,
    peer_window: u16,
    /// The client sent FIN (counted in `rcv_nxt`).
    pub peer_fin: bool,
    /// The server closes: its FIN follows the last reply byte.
    our_fin: bool,
    /// The client acknowledged the server's FIN.
    fin_acked: bool,
    /// An invalid frame arrived: replies before it are sent, then FIN; more data is reset.
    pub rejected: bool,
    /// When the last segment arrived (seconds of the datapath's clock).
    pub last_seen: u32,
    decoder: StreamDecoder,
    out_len: u16,
    out: [u8; OUT_CAP],
}

/// What a connection does with one segment.
pub enum Step {
    /// Send the connection's segment (see [`Conn::segment`]).
    Answer,
    /// Send nothing.
    Quiet,
    /// Reset the connection: send RST and forget it.
    Reset,
    /// Send the connection's segment, then forget it (the exchange ended with this segment).
    AnswerThenForget,
    /// The exchange is over: forget the connection without a word.
    Forget,
}

impl Conn {
    /// A connection whose handshake just completed: the client's next byte is `rcv_nxt`, the
    /// server's `snd_una`.
    pub fn new(protocol: Protocol, rcv_nxt: u32, snd_una: u32, mss: u16, now: u32) -> Conn {
        Conn {
            protocol,
            rcv_nxt,
            snd_una,
            snd_max: snd_una,
            ack_sent: rcv_nxt,
            mss,
            peer_window: 0,
            peer_fin: false,
            our_fin: false,
            fin_acked: false,
            rejected: false,
            last_seen: now,
            decoder: StreamDecoder::default(),
            out_len: 0,
            out: [0; OUT_CAP],
        }
    }

    /// The receive window: how many more request bytes fit, their replies included. The reply
    /// buffer counts at most one client MSS, so every reply waiting fits in one segment: a segment
    /// that is lost is always followed by one that carries its bytes again. Bytes carried in the
    /// decoder are subtracted, so answering them never moves the window's right edge back.
    pub fn window(&self) -> usize {
        let cap = OUT_CAP.min(usize::from(self.mss));
        cap.saturating_sub(SLACK + usize::from(self.out_len) + self.decoder.carried())
    }

    /// Sequence numbers the server has sent and the client not yet acknowledged (FIN included).
    fn in_flight(&self) -> u32 {
        self.snd_max.wrapping_sub(self.snd_una)
    }

    /// Applies the client's acknowledgement and window. False when it acknowledges something never
    /// sent (the segment is then answered with an ACK and otherwise ignored).
    fn take_ack(&mut self, ack: u32, window: u16) -> bool {
        let acked = ack.wrapping_sub(self.snd_una);
        if (acked as i32) < 0 {
            // An old acknowledgement (reordered): nothing new, the window is stale too.
            return true;
        }
        if acked > self.in_flight() {
            return false;
        }
        let data = (acked as usize).min(usize::from(self.out_len));
        self.out.copy_within(data..usize::from(self.out_len), 0);
        self.out_len -= data as u16;
        if acked as usize > data {
            self.fin_acked = true;
        }
        self.snd_una = ack;
        self.peer_window = window;
        true
    }

    /// Whether sending now would carry reply bytes or a FIN the client has not been sent yet.
    fn has_unsent(&self) -> bool {
        let end = self.snd_una.wrapping_add(u32::from(self.out_len));
        let end = end.wrapping_add(u32::from(self.our_fin && !self.fin_acked));
        let room = usize::from(self.peer_window.min(self.mss)).min(usize::from(self.out_len));
        before(self.snd_max, end) && (room > 0 || self.out_len == 0)
    }

    /// The segment the connection sends now: every unacknowledged reply byte the client's MSS and
    /// window allow from `snd_una`, and FIN once it closes and the last reply byte is in the segment.
    ///
    /// It acknowledges what was received less the requests whose replies it cannot carry (a reply
    /// held by the client's window), never less than it acknowledged before: the client's own
    /// retransmission timer then resends those requests, and the answer to that carries the replies
    /// once the window allows. So no reply ever waits on a segment of the client's that may never
    /// come (a lost window update), and the server needs no persist timer. The window's right edge
    /// stays where [`Conn::window`] puts it. (Replies are as long as their requests.)
    pub fn segment(&mut self) -> Outgoing<'_> {
        let n = usize::from(self.out_len)
            .min(usize::from(self.mss))
            .min(usize::from(self.peer_window));
        let fin = self.our_fin && !self.fin_acked && n == usize::from(self.out_len);
        let mut flags = ACK;
        if n > 0 {
            flags |= PSH;
        }
        if fin {
            flags |= FIN;
        }
        let end = self.snd_una.wrapping_add(n as u32 + u32::from(fin));
        if before(self.snd_max, end) {
            self.snd_max = end;
        }
        let held = u32::from(self.out_len) - n as u32;
        let mut ack = self.rcv_nxt.wrapping_sub(held);
        if before(ack, self.ack_sent) {
            ack = self.ack_sent;
        }
        self.ack_sent = ack;
        let window = self.window() + self.rcv_nxt.wrapping_sub(ack) as usize;
        Outgoing {
            seq: self.snd_una,
            ack,
            flags,
            window: window.min(usize::from(u16::MAX)) as u16,
            mss: None,
            payload: &self.out[..n],
        }
    }

    /// Takes one segment of an established connection (not RST, not SYN: the table handles those).
    pub fn receive(&mut self, seg: &Segment, stats: &WorkerStats, counter: &dyn Counter) -> Step {
        if seg.flags & ACK == 0 {
            return Step::Quiet;
        }
        let advanced = before(self.snd_una, seg.ack);
        if !self.take_ack(seg.ack, seg.window) {
            return Step::Answer;
        }
        if self.fin_acked && self.peer_fin {
            return Step::Forget;
        }
        let fin = seg.flags & FIN != 0;
        if seg.payload.is_empty() && !fin {
            return self.pure_ack(seg.seq, advanced);
        }
        if before(self.rcv_nxt, seg.seq) {
            stats.tcp.out_of_order.add(1);
            return Step::Answer;
        }
        // Bytes already received are never fed again: only what lies beyond rcv_nxt is new.
        let old = self.rcv_nxt.wrapping_sub(seg.seq) as usize;
        if old > 0 && !seg.payload.is_empty() {
            stats.tcp.retransmitted.add(1);
        }
        if old > seg.payload.len() {
            // Wholly old (a FIN already counted is one byte past the data): answer again.
            return Step::Answer;
        }
        self.take_data(&seg.payload[old..], fin, stats, counter)
    }

    /// A segment without data or FIN: a keepalive probe (one byte before rcv_nxt) is answered; so
    /// is an ACK after which replies or a FIN are still to send, or one that acknowledges nothing
    /// new while replies wait (the client lacks them). Any other ACK is not answered.
    fn pure_ack(&mut self, seq: u32, advanced: bool) -> Step {
        let keepalive = seq == self.rcv_nxt.wrapping_sub(1);
        let duplicate = !advanced && self.out_len > 0;
        if keepalive || duplicate || self.has_unsent() {
            Step::Answer
        } else {
            Step::Quiet
        }
    }

    /// New in-order data (and FIN): fed to the core as far as the window reaches, its replies
    /// appended to the reply buffer.
    fn take_data(
        &mut self,
        data: &[u8],
        fin: bool,
        stats: &WorkerStats,
        counter: &dyn Counter,
    ) -> Step {
        if !data.is_empty() && (self.rejected || self.peer_fin) {
            // Data after the server closed for an invalid frame, or after the client's FIN.
            return Step::Reset;
        }
        let take = data.len().min(self.window());
        let fin = fin && take == data.len();
        if take > 0 {
            self.feed(&data[..take], stats, counter);
        }
        if fin && !self.peer_fin {
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.peer_fin = true;
            self.our_fin = true;
            if self.decoder.pending() > 0 && !self.rejected {
                // The stream ended mid-frame, as the kernel path counts it.
                stats.requests.add(1);
                stats.count_drop(DropReason::WrongLength);
            }
            if self.fin_acked {
                // The server closed first (an invalid frame) and its FIN is acknowledged: this
                // ACK of the client's FIN is the last segment of the connection.
                return Step::AnswerThenForget;
            }
        }
        Step::Answer
    }

    fn feed(&mut self, data: &[u8], stats: &WorkerStats, counter: &dyn Counter) {
        let start = usize::from(self.out_len);
        let output = self
            .decoder
            .feed(self.protocol, data, &mut self.out[start..], stats, counter);
        self.rcv_nxt = self.rcv_nxt.wrapping_add(data.len() as u32);
        self.out_len += output.reply_len as u16;
        stats.replies.add(u64::from(output.replies));
        stats.tx_bytes.add(output.reply_len as u64);
        if output.error.is_some() {
            stats.conns_rejected.add(1);
            self.rejected = true;
            self.our_fin = true;
        }
    }
}
