//! One client thread (`Client`): its flows, its epoll set and pacing timer, and the loop that sends
//! what is due, receives what arrived, expires what timed out and counts late replies on retired
//! sockets.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::conn::Conn;
use super::flow::{Flow, Requests};
use super::plan::Plan;
use super::recorder::{Recorder, ThreadResult};
use crate::core::Protocol;

/// The epoll token of the open-loop pacing timer (flows use their index).
const TIMER_TOKEN: u64 = u64::MAX;
/// The receive timeout of a single closed-loop connection read directly (not through epoll).
const DIRECT_READ_TIMEOUT: Duration = Duration::from_millis(10);
/// How often retired sockets are read. Late replies are counted, not timed, so this only bounds
/// how long they wait in the socket.
const RETIRED_READ_INTERVAL: Duration = Duration::from_millis(1);

/// Runs one client thread over `conns` (each with its index among all the run's connections) from
/// `start` until nothing is left to send or in flight, publishing the replies received so far in
/// `progress`.
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
        let now = Instant::now();
        client.expire(now)?;
        client.read_retired(now)?;
        progress.store(client.rec.received(), Ordering::Relaxed);
    }
    let last_value = client.flows.iter().filter_map(Flow::last_value).max();
    Ok(client.rec.finish(last_value))
}

/// One client thread: its flows, its epoll set and what it measured.
struct Client<'a> {
    plan: &'a Plan,
    flows: Vec<Flow>,
    rec: Recorder<'a>,
    epoll: Epoll,
    /// Wakes the open-loop client for sub-millisecond waits (epoll counts in milliseconds).
    timer: TimerFd,
    /// One closed-loop connection: receive on the socket itself (blocking with a short timeout,
    /// or non-blocking when spinning) instead of through epoll: one syscall less per request.
    direct: bool,
    /// Direct reads that block: how long at most (None: the sockets never block).
    direct_read_timeout: Option<Duration>,
    /// Counter requests over UDP: a flow whose requests timed out moves to a fresh socket.
    fresh_after_timeout: bool,
    send_end: Option<Instant>,
    requests: Requests,
    recv_buf: Vec<u8>,
    events: Vec<EpollEvent>,
    next_retired_read: Instant,
}

impl<'a> Client<'a> {
    fn new(plan: &'a Plan, conns: Vec<(usize, Conn)>, start: Instant) -> Result<Client<'a>> {
        let (epoll, timer) = epoll_with_timer()?;
        let direct = conns.len() == 1 && plan.interval.is_none();
        let direct_read_timeout = (direct && !plan.spin).then_some(DIRECT_READ_TIMEOUT);
        let mut flows = Vec::with_capacity(conns.len());
        for (token, (global_index, conn)) in conns.into_iter().enumerate() {
            epoll.add(
                conn.fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, token as u64),
            )?;
            if let Some(timeout) = direct_read_timeout {
                conn.set_blocking_with_timeout(timeout)?;
            }
            flows.push(Flow::new(plan, conn, global_index, start));
        }
        Ok(Client {
            plan,
            flows,
            rec: Recorder::new(plan, start),
            epoll,
            timer,
            direct,
            direct_read_timeout,
            fresh_after_timeout: plan.target.protocol == Protocol::Counter
                && !plan.target.transport.is_stream(),
            send_end: plan.send_for.map(|d| start + d),
            requests: Requests::new(plan),
            recv_buf: vec![0u8; 65536],
            events: vec![EpollEvent::empty(); 256],
            next_retired_read: start,
        })
    }

    /// Sends what is due on every flow; true when the run is over (nothing left to send, nothing
    /// in flight).
    fn send_due(&mut self, now: Instant) -> Result<bool> {
        let sending = self.send_end.is_none_or(|end| now < end);
        let mut done = true;
        for flow in &mut self.flows {
            if sending && flow.has_budget() {
                done = false;
                flow.send_due(self.plan, &mut self.requests, &mut self.rec, now)?;
            }
            if !flow.is_idle() {
                done = false;
            }
        }
        Ok(done)
    }

    /// Waits for replies, no longer than the next scheduled send or timeout check, and reads them.
    fn receive(&mut self, now: Instant) -> Result<()> {
        if self.direct {
            let once = !self.plan.spin;
            let flow = &mut self.flows[0];
            return flow.receive(self.plan, &mut self.recv_buf, &mut self.rec, once);
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
            flow.receive(self.plan, &mut self.recv_buf, &mut self.rec, false)?;
        }
        Ok(())
    }

    /// How long epoll may sleep: not at all when spinning, 10 ms in closed loop (the timeout
    /// check), and in open loop until the next scheduled send (at most 10 ms, through the timer).
    fn wait_timeout(&self, now: Instant) -> Result<EpollTimeout> {
        if self.plan.spin {
            return Ok(EpollTimeout::ZERO);
        }
        if self.plan.interval.is_none() {
            return Ok(EpollTimeout::from(10u16));
        }
        // epoll's timeout has millisecond resolution; sub-millisecond waits until the next
        // scheduled send go through a timerfd, so the open-loop client sleeps instead of spinning.
        // epoll's own 20 ms is only a backstop should the timer's wake-up be missed.
        let next = self.flows.iter().map(Flow::next_send).min().unwrap_or(now);
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

    /// Expires requests past the timeout, and moves counter flows over UDP whose requests all
    /// timed out to fresh sockets.
    fn expire(&mut self, now: Instant) -> Result<()> {
        for (token, flow) in self.flows.iter_mut().enumerate() {
            flow.expire(&mut self.rec, now);
            if self.fresh_after_timeout && flow.only_timed_out() {
                flow.move_to_fresh_socket(&self.epoll, token as u64, self.direct_read_timeout)?;
            }
        }
        Ok(())
    }

    /// Counts late replies on retired sockets, every `RETIRED_READ_INTERVAL`.
    fn read_retired(&mut self, now: Instant) -> Result<()> {
        if now < self.next_retired_read {
            return Ok(());
        }
        self.next_retired_read = now + RETIRED_READ_INTERVAL;
        for flow in &mut self.flows {
            flow.read_retired(&mut self.recv_buf, &mut self.rec, now)?;
        }
        Ok(())
    }
}

/// An epoll set with the (non-blocking) open-loop pacing timer in it.
fn epoll_with_timer() -> Result<(Epoll, TimerFd)> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let timer = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )?;
    epoll.add(
        timer.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, TIMER_TOKEN),
    )?;
    Ok((epoll, timer))
}
