//! One client thread: its flows (connections with their requests in flight), the send schedule,
//! and the epoll loop that sends what is due, receives what arrived and expires what timed out.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::conn::{fresh_udp_socket, Conn};
use super::pending::{Pending, Recorder};
use super::report::new_histogram;
use super::{Plan, ThreadResult};
use crate::core::Protocol;
use crate::wire::{CounterRepr, FRAME_LEN};

/// The client side of one connection during a run.
pub(super) struct Flow {
    pub(super) conn: Conn,
    pub(super) pending: Pending,
    /// Counter over UDP: sockets left after a timeout, read only to count late replies.
    pub(super) retired: Vec<Retired>,
    pub(super) next_seq: u64,
    /// Requests still to send in a count run.
    pub(super) budget: Option<u64>,
    pub(super) next_send: Instant,
    /// Stream transports: bytes of a partial reply.
    pub(super) partial: Vec<u8>,
    /// Stream transports: request bytes the socket did not take yet.
    pub(super) unsent: Vec<u8>,
    pub(super) last_value: Option<u64>,
}

/// A socket a flow moved away from, kept open until the late replies it waits for come or are
/// forgotten.
pub(super) struct Retired {
    pub(super) socket: UdpSocket,
    pub(super) pending: Pending,
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

    /// Counter requests over UDP, after a timeout with nothing else in flight: sends from a fresh
    /// socket (a new source port) from now on, so a late reply can never be taken for the answer
    /// to a newer request. The old socket is read only to count late replies, and closed once they
    /// came or were forgotten (`LATE_WINDOW_TIMEOUTS` after the timeout).
    pub(super) fn move_to_fresh_socket(
        &mut self,
        epoll: &Epoll,
        token: u64,
        blocking: bool,
    ) -> Result<()> {
        let Conn::Udp(old) = &self.conn else {
            return Ok(());
        };
        // Out of descriptors or ports: keep the socket; late replies are then matched in order.
        let Ok(fresh) = fresh_udp_socket(old) else {
            return Ok(());
        };
        let fresh = Conn::Udp(fresh);
        if blocking {
            fresh.set_blocking_with_timeout(DIRECT_READ_TIMEOUT)?;
        }
        epoll.add(fresh.fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))?;
        if let Conn::Udp(old) = std::mem::replace(&mut self.conn, fresh) {
            epoll.delete(old.as_fd())?;
            old.set_nonblocking(true)?;
            let pending = std::mem::take(&mut self.pending);
            self.pending.in_flight.reserve(pending.in_flight.capacity());
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

/// A receive that found nothing, or an ICMP error for an earlier datagram (nobody listening).
pub(super) fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
    )
}

/// The epoll token of the open-loop pacing timer (flows use their index).
pub(super) const TIMER_TOKEN: u64 = u64::MAX;
/// The receive timeout of a single closed-loop connection read directly (not through epoll).
pub(super) const DIRECT_READ_TIMEOUT: Duration = Duration::from_millis(10);
/// How often retired sockets are read. Late replies are counted, not timed, so this only bounds
/// how long they wait in the socket.
pub(super) const RETIRED_READ_INTERVAL: Duration = Duration::from_millis(1);

/// The request bytes: one counter frame, or an echo/sockperf message rewritten per request.
pub(super) struct Requests {
    pub(super) counter: [u8; FRAME_LEN],
    pub(super) message: Vec<u8>,
}

impl Requests {
    pub(super) fn payload(&mut self, protocol: Protocol, seq: u64) -> &[u8] {
        match protocol {
            Protocol::Counter => &self.counter,
            Protocol::Echo | Protocol::Sockperf => {
                fill_message(&mut self.message, protocol, seq);
                &self.message
            }
        }
    }
}

/// One client thread: its flows, its epoll set and what it measured.
pub(super) struct Client<'a> {
    pub(super) plan: &'a Plan,
    pub(super) flows: Vec<Flow>,
    pub(super) rec: Recorder<'a>,
    pub(super) epoll: Epoll,
    /// Wakes the open-loop client for sub-millisecond waits (epoll counts in milliseconds).
    pub(super) timer: TimerFd,
    /// One closed-loop connection: receive on the socket itself (blocking with a short timeout,
    /// or non-blocking when spinning) instead of through epoll: one syscall less per request.
    pub(super) direct: bool,
    pub(super) send_end: Option<Instant>,
    pub(super) requests: Requests,
    pub(super) recv_buf: Vec<u8>,
    pub(super) events: Vec<EpollEvent>,
    pub(super) next_retired_read: Instant,
}

pub(super) fn run_thread(
    plan: &Plan,
    conns: Vec<(usize, Conn)>,
    start: Instant,
    progress: &AtomicU64,
) -> Result<(ThreadResult, Histogram<u64>)> {
    let mut client = Client::new(plan, conns, start)?;
    while Instant::now() < start {
        std::hint::spin_loop();
    }
    loop {
        let now = Instant::now();
        if client.send_due(now)? {
            break;
        }
        client.receive(now)?;
        client.housekeeping()?;
        progress.store(client.rec.result.received, Ordering::Relaxed);
    }
    let mut result = client.rec.result;
    result.last_value = client.flows.iter().filter_map(|f| f.last_value).max();
    Ok((result, client.rec.hist))
}

impl<'a> Client<'a> {
    pub(super) fn new(
        plan: &'a Plan,
        conns: Vec<(usize, Conn)>,
        start: Instant,
    ) -> Result<Client<'a>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        epoll.add(
            timer.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TIMER_TOKEN),
        )?;
        let mut flows: Vec<Flow> = Vec::with_capacity(conns.len());
        for (k, (global_index, conn)) in conns.into_iter().enumerate() {
            epoll.add(conn.fd(), EpollEvent::new(EpollFlags::EPOLLIN, k as u64))?;
            flows.push(Flow::new(plan, conn, global_index, start));
        }
        let direct = flows.len() == 1 && plan.interval.is_none();
        if direct && !plan.spin {
            flows[0]
                .conn
                .set_blocking_with_timeout(DIRECT_READ_TIMEOUT)?;
        }
        let rec = Recorder {
            plan,
            hist: new_histogram(),
            result: ThreadResult::default(),
            warmup_end: start + plan.warmup,
            collect_values: plan.target.protocol == Protocol::Counter && plan.increment != 0,
        };
        Ok(Client {
            plan,
            flows,
            rec,
            epoll,
            timer,
            direct,
            send_end: plan.send_for.map(|d| start + d),
            requests: Requests {
                counter: CounterRepr {
                    value: plan.increment,
                }
                .to_bytes(),
                message: vec![0u8; plan.message_size],
            },
            recv_buf: vec![0u8; 65536],
            events: vec![EpollEvent::empty(); 256],
            next_retired_read: start,
        })
    }

    /// Sends what is due on every flow; true when the run is over (nothing left to send, nothing
    /// in flight).
    pub(super) fn send_due(&mut self, now: Instant) -> Result<bool> {
        let sending = self.send_end.is_none_or(|end| now < end);
        let mut done = true;
        for flow in &mut self.flows {
            if sending && flow.budget.is_none_or(|b| b > 0) {
                done = false;
                send_flow(self.plan, flow, &mut self.requests, &mut self.rec, now)?;
            }
            if flow.pending.in_flight() > 0 || !flow.unsent.is_empty() {
                done = false;
            }
        }
        Ok(done)
    }

    /// Waits for replies, no longer than the next scheduled send or timeout check, and reads them.
    pub(super) fn receive(&mut self, now: Instant) -> Result<()> {
        if self.direct {
            let once = !self.plan.spin;
            return receive_replies(&mut self.flows[0], &mut self.recv_buf, &mut self.rec, once);
        }
        let timeout = self.wait_timeout(now)?;
        let n = match self.epoll.wait(&mut self.events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for event in &self.events[..n] {
            if event.data() == TIMER_TOKEN {
                let _ = self.timer.wait();
                continue;
            }
            let flow = &mut self.flows[event.data() as usize];
            receive_replies(flow, &mut self.recv_buf, &mut self.rec, false)?;
        }
        Ok(())
    }

    pub(super) fn wait_timeout(&self, now: Instant) -> Result<EpollTimeout> {
        if self.plan.spin {
            return Ok(EpollTimeout::ZERO);
        }
        if self.plan.interval.is_none() {
            return Ok(EpollTimeout::from(10u16));
        }
        // epoll's timeout has millisecond resolution; sub-millisecond waits until the next
        // scheduled send go through a timerfd, so the open-loop client sleeps instead of spinning.
        let next = self.flows.iter().map(|f| f.next_send).min().unwrap_or(now);
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(10));
        if wait.is_zero() {
            return Ok(EpollTimeout::ZERO);
        }
        self.timer.set(
            Expiration::OneShot(TimeSpec::from_duration(wait)),
            TimerSetTimeFlags::empty(),
        )?;
        Ok(EpollTimeout::from(20u16))
    }

    /// Expires requests past the timeout, moves counter flows to fresh sockets after a timeout,
    /// and counts late replies on retired sockets.
    pub(super) fn housekeeping(&mut self) -> Result<()> {
        let now = Instant::now();
        let fresh_after_timeout = self.plan.target.protocol == Protocol::Counter
            && !self.plan.target.transport.is_stream();
        let blocking = self.direct && !self.plan.spin;
        let read_retired = now >= self.next_retired_read;
        if read_retired {
            self.next_retired_read = now + RETIRED_READ_INTERVAL;
        }
        for (token, flow) in self.flows.iter_mut().enumerate() {
            self.rec.expire(&mut flow.pending, now);
            if flow.conn.is_stream() && !flow.pending.awaits_replies() {
                // A stream reply can only be partial while a reply is awaited.
                flow.partial.clear();
            }
            if fresh_after_timeout && flow.pending.only_timed_out() {
                flow.move_to_fresh_socket(&self.epoll, token as u64, blocking)?;
            }
            if read_retired && !flow.retired.is_empty() {
                flow.read_retired(&mut self.recv_buf, &mut self.rec, now)?;
            }
        }
        Ok(())
    }
}

/// Sends the requests due on one flow: up to the depth, within the budget, and in open loop only
/// those whose scheduled time has come.
pub(super) fn send_flow(
    plan: &Plan,
    flow: &mut Flow,
    requests: &mut Requests,
    rec: &mut Recorder,
    now: Instant,
) -> Result<()> {
    while flow.budget.is_none_or(|b| b > 0)
        && flow.pending.in_flight() < plan.depth
        && (plan.interval.is_none() || flow.next_send <= now)
    {
        let seq = flow.next_seq;
        let intended = match plan.interval {
            Some(_) => flow.next_send,
            None => Instant::now(),
        };
        if !send_request(flow, requests.payload(plan.target.protocol, seq))? {
            // The socket is full: the same request, with the same intended time, goes next turn.
            break;
        }
        flow.next_seq += 1;
        if let Some(interval) = plan.interval {
            // next_send <= now here, so this stays one interval ahead of the clock.
            flow.next_send += interval;
        }
        if intended >= rec.warmup_end {
            rec.result.sent += 1;
            if let Some(b) = flow.budget.as_mut() {
                *b -= 1;
            }
        }
        flow.pending.push(intended, seq);
    }
    Ok(())
}

/// Builds an echo or sockperf request carrying `seq`.
pub(super) fn fill_message(buf: &mut [u8], protocol: Protocol, seq: u64) {
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

/// Sends one request; false when the socket is full (try again later).
pub(super) fn send_request(flow: &mut Flow, payload: &[u8]) -> Result<bool> {
    match &mut flow.conn {
        Conn::Udp(s) => match s.send(payload) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // An ICMP error from an earlier datagram (nobody listening): the request is lost.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
            Err(e) => Err(e).context("send failed"),
        },
        Conn::Stream(f) => {
            if !flow.unsent.is_empty() {
                let n = write_some(f, &flow.unsent)?;
                flow.unsent.drain(..n);
                if !flow.unsent.is_empty() {
                    return Ok(false);
                }
            }
            let n = write_some(f, payload)?;
            flow.unsent.extend_from_slice(&payload[n..]);
            Ok(true)
        }
    }
}

pub(super) fn write_some(f: &mut File, bytes: &[u8]) -> Result<usize> {
    match f.write(bytes) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e).context("connection write failed (did the server close it?)"),
    }
}

/// Reads a flow's replies. Through epoll or when spinning it reads at least once (a reply may be
/// late or unexpected: it must leave the socket), then while requests are in flight. `once`, on a
/// blocking socket, reads once and only when a reply is awaited, so the caller can send the next
/// request without a wasted syscall.
pub(super) fn receive_replies(
    flow: &mut Flow,
    buf: &mut [u8],
    rec: &mut Recorder,
    once: bool,
) -> Result<()> {
    let mut reads = 0;
    loop {
        let expecting = flow.pending.in_flight() > 0;
        let more = if once {
            reads == 0 && expecting
        } else {
            reads == 0 || expecting
        };
        if !more {
            return Ok(());
        }
        reads += 1;
        let n = match &mut flow.conn {
            Conn::Udp(s) => s.recv(buf),
            Conn::Stream(f) => f.read(buf),
        };
        let n = match n {
            Ok(0) if flow.conn.is_stream() => bail!("the server closed a connection"),
            Ok(n) => n,
            Err(e) if is_transient(&e) => return Ok(()),
            Err(e) => return Err(e).context("receive failed"),
        };
        if !flow.conn.is_stream() {
            rec.on_reply(&mut flow.pending, &mut flow.last_value, &buf[..n]);
            continue;
        }
        flow.partial.extend_from_slice(&buf[..n]);
        let reply_len = rec.plan.message_size;
        let whole = flow.partial.len() / reply_len * reply_len;
        for reply in flow.partial[..whole].chunks_exact(reply_len) {
            rec.on_reply(&mut flow.pending, &mut flow.last_value, reply);
        }
        flow.partial.drain(..whole);
    }
}
