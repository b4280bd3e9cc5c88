//! One connection during a run (`Flow`): sending the requests that are due, reading the replies,
//! expiring what timed out, and for counter requests over UDP the move to a fresh socket after a
//! timeout. Also the request bytes (`Requests`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};

use super::conn::{fresh_udp_socket, Conn};
use super::pending::Pending;
use super::plan::Plan;
use super::recorder::Recorder;
use crate::core::Protocol;
use crate::wire::{CounterRepr, FRAME_LEN};

/// The client side of one connection during a run.
pub(super) struct Flow {
    conn: Conn,
    pending: Pending,
    /// Counter over UDP: sockets left after a timeout, read only to count late replies.
    retired: Vec<Retired>,
    next_seq: u64,
    /// Requests still to send in a count run.
    budget: Option<u64>,
    next_send: Instant,
    /// Stream transports: bytes of a partial reply.
    partial: Vec<u8>,
    /// Stream transports: request bytes the socket did not take yet.
    unsent: Vec<u8>,
    last_value: Option<u64>,
}

/// A socket a flow moved away from, kept open until the late replies it waits for come or are
/// forgotten.
struct Retired {
    socket: UdpSocket,
    pending: Pending,
}

impl Flow {
    /// Connection `global_index` of the run's `plan.connections`.
    pub(super) fn new(plan: &Plan, conn: Conn, global_index: usize, start: Instant) -> Flow {
        // Spread open-loop connections evenly over one interval.
        let offset = plan
            .interval
            .map(|iv| iv.mul_f64(global_index as f64 / plan.connections.max(1) as f64))
            .unwrap_or_default();
        Flow {
            conn,
            pending: Pending::with_capacity(plan.depth),
            retired: Vec::new(),
            next_seq: 1,
            budget: plan.requests_per_conn.as_ref().map(|v| v[global_index]),
            next_send: start + offset,
            partial: Vec::new(),
            unsent: Vec::new(),
            last_value: None,
        }
    }

    /// Requests are left to send: always in a duration run, until the budget is spent in a count run.
    pub(super) fn has_budget(&self) -> bool {
        self.budget.is_none_or(|b| b > 0)
    }

    /// Nothing in flight and no request bytes waiting for the socket.
    pub(super) fn is_idle(&self) -> bool {
        self.pending.in_flight() == 0 && self.unsent.is_empty()
    }

    /// When the next request is due (open loop).
    pub(super) fn next_send(&self) -> Instant {
        self.next_send
    }

    /// The last counter value this connection saw (counter protocol).
    pub(super) fn last_value(&self) -> Option<u64> {
        self.last_value
    }

    /// Some request timed out and nothing else is in flight.
    pub(super) fn only_timed_out(&self) -> bool {
        self.pending.only_timed_out()
    }

    /// Sends the requests due: up to the depth, within the budget, and in open loop only those
    /// whose scheduled time has come.
    pub(super) fn send_due(
        &mut self,
        plan: &Plan,
        requests: &mut Requests,
        rec: &mut Recorder,
        now: Instant,
    ) -> Result<()> {
        while self.has_budget()
            && self.pending.in_flight() < plan.depth
            && (plan.interval.is_none() || self.next_send <= now)
        {
            let seq = self.next_seq;
            let intended = match plan.interval {
                Some(_) => self.next_send,
                None => Instant::now(),
            };
            if !self.send_request(requests.payload(plan.target.protocol, seq))? {
                // The socket is full: the same request, with the same intended time, goes next turn.
                break;
            }
            self.next_seq += 1;
            if let Some(interval) = plan.interval {
                // next_send <= now here, so this stays one interval ahead of the clock.
                self.next_send += interval;
            }
            if rec.on_sent(intended) {
                if let Some(b) = self.budget.as_mut() {
                    *b -= 1;
                }
            }
            self.pending.push(intended, seq);
        }
        Ok(())
    }

    /// Sends one request; false when the socket is full (try again later).
    fn send_request(&mut self, payload: &[u8]) -> Result<bool> {
        match &mut self.conn {
            Conn::Udp(s) => match s.send(payload) {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                // An ICMP error from an earlier datagram (nobody listening): the request is lost.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
                Err(e) => Err(e).context("send failed"),
            },
            Conn::Stream(f) => {
                if !self.unsent.is_empty() {
                    let n = write_some(f, &self.unsent)?;
                    self.unsent.drain(..n);
                    if !self.unsent.is_empty() {
                        return Ok(false);
                    }
                }
                let n = write_some(f, payload)?;
                self.unsent.extend_from_slice(&payload[n..]);
                Ok(true)
            }
        }
    }

    /// Reads the replies. Through epoll or when spinning it reads at least once (a reply may be
    /// late or unexpected: it must leave the socket), then while requests are in flight. `once`, on
    /// a blocking socket, reads once and only when a reply is awaited, so the caller can send the
    /// next request without a wasted syscall.
    pub(super) fn receive(
        &mut self,
        plan: &Plan,
        buf: &mut [u8],
        rec: &mut Recorder,
        once: bool,
    ) -> Result<()> {
        let mut reads = 0;
        loop {
            let expecting = self.pending.in_flight() > 0;
            let more = if once {
                reads == 0 && expecting
            } else {
                reads == 0 || expecting
            };
            if !more {
                return Ok(());
            }
            reads += 1;
            let n = match &mut self.conn {
                Conn::Udp(s) => s.recv(buf),
                Conn::Stream(f) => f.read(buf),
            };
            let n = match n {
                Ok(0) if self.conn.is_stream() => bail!("the server closed a connection"),
                Ok(n) => n,
                Err(e) if is_transient(&e) => return Ok(()),
                Err(e) => return Err(e).context("receive failed"),
            };
            self.on_bytes(plan, &buf[..n], rec);
        }
    }

    /// Hands received bytes to the recorder: a datagram is one reply; a stream carries whole
    /// replies of the request's size, the last one possibly cut (kept for the next read).
    fn on_bytes(&mut self, plan: &Plan, bytes: &[u8], rec: &mut Recorder) {
        if !self.conn.is_stream() {
            rec.on_reply(&mut self.pending, &mut self.last_value, bytes);
            return;
        }
        self.partial.extend_from_slice(bytes);
        let reply_len = plan.message_size;
        let whole = self.partial.len() / reply_len * reply_len;
        for reply in self.partial[..whole].chunks_exact(reply_len) {
            rec.on_reply(&mut self.pending, &mut self.last_value, reply);
        }
        self.partial.drain(..whole);
    }

    /// Expires the requests past the timeout.
    pub(super) fn expire(&mut self, rec: &mut Recorder, now: Instant) {
        rec.expire(&mut self.pending, now);
        if self.conn.is_stream() && !self.pending.awaits_replies() {
            // A stream reply can only be partial while a reply is awaited.
            self.partial.clear();
        }
    }

    /// Counter requests over UDP, after a timeout with nothing else in flight: sends from a fresh
    /// socket (a new source port) from now on, so a late reply can never be taken for the answer
    /// to a newer request. The old socket is read only to count late replies, and closed once they
    /// came or were forgotten (`LATE_WINDOW_TIMEOUTS` after the timeout). `read_timeout`: the
    /// fresh socket blocks for at most this long, like the one it replaces (direct reads).
    pub(super) fn move_to_fresh_socket(
        &mut self,
        epoll: &Epoll,
        token: u64,
        read_timeout: Option<Duration>,
    ) -> Result<()> {
        let Conn::Udp(old) = &self.conn else {
            return Ok(());
        };
        // Out of descriptors or ports: keep the socket; late replies are then matched in order.
        let Ok(fresh) = fresh_udp_socket(old) else {
            return Ok(());
        };
        let fresh = Conn::Udp(fresh);
        if let Some(timeout) = read_timeout {
            fresh.set_blocking_with_timeout(timeout)?;
        }
        epoll.add(fresh.fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))?;
        if let Conn::Udp(old) = std::mem::replace(&mut self.conn, fresh) {
            epoll.delete(old.as_fd())?;
            old.set_nonblocking(true)?;
            let fresh_pending = self.pending.empty_like();
            let pending = std::mem::replace(&mut self.pending, fresh_pending);
            self.retired.push(Retired {
                socket: old,
                pending,
            });
        }
        Ok(())
    }

    /// Counts the late replies waiting on retired sockets, and closes the sockets that wait for
    /// nothing more.
    pub(super) fn read_retired(
        &mut self,
        buf: &mut [u8],
        rec: &mut Recorder,
        now: Instant,
    ) -> Result<()> {
        for retired in &mut self.retired {
            loop {
                match retired.socket.recv(buf) {
                    Ok(n) => rec.on_reply(&mut retired.pending, &mut None, &buf[..n]),
                    Err(e) if is_transient(&e) => break,
                    Err(e) => return Err(e).context("receive failed"),
                }
            }
            rec.expire(&mut retired.pending, now);
        }
        self.retired.retain(|r| r.pending.awaits_replies());
        Ok(())
    }
}

fn write_some(f: &mut File, bytes: &[u8]) -> Result<usize> {
    match f.write(bytes) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e).context("connection write failed (did the server close it?)"),
    }
}

/// A receive that found nothing, or an ICMP error for an earlier datagram (nobody listening).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
    )
}

/// The request bytes: one counter frame, or an echo/sockperf message rewritten per request.
pub(super) struct Requests {
    counter: [u8; FRAME_LEN],
    message: Vec<u8>,
}

impl Requests {
    pub(super) fn new(plan: &Plan) -> Requests {
        Requests {
            counter: CounterRepr {
                value: plan.increment,
            }
            .to_bytes(),
            message: vec![0u8; plan.message_size],
        }
    }

    fn payload(&mut self, protocol: Protocol, seq: u64) -> &[u8] {
        match protocol {
            Protocol::Counter => &self.counter,
            Protocol::Echo | Protocol::Sockperf => {
                fill_message(&mut self.message, protocol, seq);
                &self.message
            }
        }
    }
}

/// Builds an echo or sockperf request carrying `seq`.
fn fill_message(buf: &mut [u8], protocol: Protocol, seq: u64) {
    buf[0..8].copy_from_slice(&seq.to_be_bytes());
    if protocol == Protocol::Sockperf {
        // flags as sockperf 3.7 sends them: 0x0002 (a client message) | 0x0001 (asks for a reply);
        // sockperf's own server ignores messages without both. Length: the whole message.
        buf[8..10].copy_from_slice(&0x0003u16.to_be_bytes());
        let len = buf.len() as u32;
        buf[10..14].copy_from_slice(&len.to_be_bytes());
    } else {
        buf[8..14].fill(0xab);
    }
}
