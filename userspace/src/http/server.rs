//! The HTTP/1.1 server: its own worker threads, each an epoll loop over its SO_REUSEPORT listener (or
//! a share of the Unix listener) and its connections. Keep-alive and pipelining; requests parsed by
//! the sans-IO parser in request.rs, which enforces the limits on the request head and body; a
//! deadline per request from its first byte, an idle timeout between requests, a process-wide
//! budget for partial requests (pending.rs), a per-source rate limit, graceful shutdown. An idle
//! connection holds no buffer.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use slab::Slab;

use super::connection::{Conn, HttpDate, Outcome, Responder, Timeouts};
use super::routes::{self, Access};
use super::state::AppState;
use crate::net::{self, Listeners, StreamListener};
use crate::spec::CpuId;
use crate::sys;

pub use super::connection::write_response;
pub use super::request::{MAX_BODY, MAX_HEAD, MAX_HEADERS};
const READ_CHUNK: usize = 16 * 1024;
const TOKEN_WAKE: u64 = u64::MAX;
const TOKEN_LISTENER: u64 = u64::MAX - 1;

/// Where the HTTP server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for HttpListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err("unix:// needs a path, e.g. unix:///run/ricochet-http.sock".into());
            }
            return Ok(HttpListen::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(HttpListen::Tcp).map_err(|_| {
            format!(
                "bad --http address '{s}': write HOST:PORT (127.0.0.1:9100), unix:///PATH or off"
            )
        })
    }
}

impl std::fmt::Display for HttpListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpListen::Tcp(a) => write!(f, "http://{a}"),
            HttpListen::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

impl HttpListen {
    /// Loopback and Unix sockets are local; anything else needs a token for privileged endpoints.
    pub fn is_local(&self) -> bool {
        match self {
            HttpListen::Tcp(a) => a.ip().is_loopback(),
            HttpListen::Unix(_) => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: HttpListen,
    pub access: Access,
    /// Requests per second per source address; 0 turns the limit off.
    pub rate_limit: u32,
    pub workers: usize,
    /// CPUs to pin the HTTP workers to (the housekeeping CPUs); empty leaves them unpinned.
    pub cpus: Vec<CpuId>,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// A running HTTP server.
pub struct HttpServer {
    pub bound: HttpListen,
    stop: Arc<AtomicBool>,
    wakes: Vec<Arc<EventFd>>,
    handles: Vec<JoinHandle<()>>,
}

/// The listener(s) bound, no thread started yet: binding may need privileges that the serving
/// threads never get.
pub struct HttpBound {
    config: HttpConfig,
    listeners: Vec<StreamListener>,
    pub bound: HttpListen,
}

impl HttpServer {
    pub fn bind(config: HttpConfig) -> Result<HttpBound> {
        let (listeners, bound) = bind(&config.listen, config.workers.max(1))?;
        Ok(HttpBound {
            config,
            listeners,
            bound,
        })
    }

    pub fn start(config: HttpConfig, state: Arc<AppState>) -> Result<HttpServer> {
        HttpServer::bind(config)?.serve(state)
    }
}

impl HttpBound {
    /// Starts one worker thread per listener.
    pub fn serve(self, state: Arc<AppState>) -> Result<HttpServer> {
        let HttpBound {
            config,
            listeners,
            bound,
        } = self;
        let limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>> =
            NonZeroU32::new(config.rate_limit)
                .map(|rate| Arc::new(RateLimiter::keyed(Quota::per_second(rate))));
        let timeouts = Timeouts {
            request: config.header_timeout,
            idle: config.idle_timeout,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut wakes = Vec::new();
        let mut handles = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let wake = Arc::new(EventFd::from_flags(
                EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
            )?);
            let worker = HttpWorker {
                responder: Responder {
                    state: state.clone(),
                    access: config.access.clone(),
                    limiter: limiter.clone(),
                    date: HttpDate::default(),
                    metrics: routes::MetricsCache::new(i as u32),
                },
                timeouts,
                listeners: Listeners::new(vec![((), listener)], TOKEN_LISTENER),
                conns: Slab::new(),
                wake: wake.clone(),
                stop: stop.clone(),
                scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            };
            let cpu = (!config.cpus.is_empty()).then(|| config.cpus[i % config.cpus.len()]);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("http-{i}"))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            let _ = sys::pin_current_thread(cpu);
                        }
                        if let Err(e) = worker.run() {
                            tracing::error!("HTTP worker {i} failed: {e:#}");
                        }
                    })
                    .context("cannot spawn an HTTP worker")?,
            );
            wakes.push(wake);
        }
        Ok(HttpServer {
            bound,
            stop,
            wakes,
            handles,
        })
    }
}

impl HttpServer {
    /// Whether a worker thread has ended (returned an error or panicked) although no shutdown was
    /// asked for: the server then answers on fewer threads, or on none.
    pub fn any_worker_finished(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && self.handles.iter().any(|h| h.is_finished())
    }

    /// Stops accepting, lets in-flight requests finish (at most `SHUTDOWN_GRACE`), closes everything.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::Relaxed);
        for wake in &self.wakes {
            let _ = wake.write(1);
        }
        for handle in self.handles {
            let _ = handle.join();
        }
    }
}

/// Binds the listener(s): one SO_REUSEPORT TCP socket per worker, or one Unix socket they share.
fn bind(listen: &HttpListen, n: usize) -> Result<(Vec<StreamListener>, HttpListen)> {
    match listen {
        HttpListen::Tcp(addr) => {
            let (ls, local) = net::bind_tcp_group(&format!("--http {addr}"), *addr, n)?;
            let listeners = ls.into_iter().map(StreamListener::Tcp).collect();
            Ok((listeners, HttpListen::Tcp(local)))
        }
        HttpListen::Unix(path) => {
            let label = format!("--http unix://{}", path.display());
            let endpoint = Arc::new(net::bind_unix(&label, path)?);
            let listeners = (0..n)
                .map(|_| StreamListener::Unix(endpoint.clone()))
                .collect();
            Ok((listeners, listen.clone()))
        }
    }
}

/// How long in-flight requests may take once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often connections are checked against their deadlines.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Switches a connection between reading and writing, with a syscall only when that changes.
fn set_interest(epoll: &Epoll, conn: &mut Conn, key: usize, writing: bool) {
    if conn.writing == writing {
        return;
    }
    conn.writing = writing;
    let flags = if writing {
        EpollFlags::EPOLLOUT
    } else {
        EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP
    };
    let mut ev = EpollEvent::new(flags, key as u64);
    let _ = epoll.modify(conn.io.as_fd(), &mut ev);
}

struct HttpWorker {
    responder: Responder,
    timeouts: Timeouts,
    listeners: Listeners<()>,
    conns: Slab<Conn>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    scratch: Box<[u8]>,
}

impl Drop for HttpWorker {
    /// Gives the budget back what the connections still hold (they close with the worker).
    fn drop(&mut self) {
        let budget = &self.responder.state.http_conns.pending;
        for (_, conn) in self.conns.iter_mut() {
            conn.partial.release(budget);
        }
    }
}

impl HttpWorker {
    fn run(mut self) -> io::Result<()> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            self.wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_WAKE),
        )?;
        self.listeners.register(&epoll)?;
        let mut events = vec![EpollEvent::empty(); 256];
        let mut last_sweep = Instant::now();
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            let timeout = self.listeners.wait_timeout(Some(SWEEP_INTERVAL / 4));
            let n = match epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            for event in &events[..n] {
                self.dispatch(&epoll, event.data(), event.events());
            }
            self.listeners.resume_due(&epoll);
            let now = Instant::now();
            if now.duration_since(last_sweep) >= SWEEP_INTERVAL {
                last_sweep = now;
                self.sweep(&epoll, now);
            }
            if self.stop.load(Ordering::Relaxed) {
                // Graceful shutdown: stop accepting, let requests in flight finish, then close.
                self.listeners.close(&epoll);
                let deadline = *shutdown_deadline.get_or_insert(now + SHUTDOWN_GRACE);
                let busy = self
                    .conns
                    .iter()
                    .any(|(_, c)| !c.partial.is_empty() || !c.outbuf.is_empty());
                if !busy || now >= deadline {
                    return Ok(());
                }
            }
        }
    }

    fn dispatch(&mut self, epoll: &Epoll, token: u64, flags: EpollFlags) {
        if token == TOKEN_WAKE {
            let _ = self.wake.read();
        } else if let Some(index) = self.listeners.index_of(token) {
            self.accept(epoll, index);
        } else {
            let key = token as usize;
            if flags.contains(EpollFlags::EPOLLOUT) {
                self.flush(epoll, key);
            }
            if flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                self.readable(epoll, key);
            }
        }
    }

    fn accept(&mut self, epoll: &Epoll, index: usize) {
        let now = Instant::now();
        let timeouts = &self.timeouts;
        let conns = &mut self.conns;
        let refused = self.listeners.accept(epoll, index, 64, |(), accepted| {
            let entry = conns.vacant_entry();
            let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
            let event = EpollEvent::new(interest, entry.key() as u64);
            if epoll.add(accepted.fd.as_fd(), event).is_ok() {
                let io = File::from(accepted.fd);
                entry.insert(Conn::new(io, accepted.peer, timeouts, now));
            }
        });
        if refused > 0 {
            let stats = &self.responder.state.http_conns;
            stats.refused.fetch_add(refused, Ordering::Relaxed);
        }
    }

    fn close(&mut self, epoll: &Epoll, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            let _ = epoll.delete(conn.io.as_fd());
            conn.partial
                .release(&self.responder.state.http_conns.pending);
        }
    }

    /// Closes connections past their deadline: a partly received request gets 408 first.
    fn sweep(&mut self, epoll: &Epoll, now: Instant) {
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.clock.deadline)
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(key) {
                if conn.clock.in_request {
                    self.responder.time_out(conn);
                    // One try: a client this slow does not get to hold the connection open longer.
                    let _ = conn.io.write(&conn.outbuf);
                }
            }
            self.close(epoll, key);
        }
        if let Some(limiter) = &self.responder.limiter {
            limiter.retain_recent();
        }
    }

    fn readable(&mut self, epoll: &Epoll, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if !conn.outbuf.is_empty() {
            // Backpressure: replies are waiting for the client; read more once they are out.
            return;
        }
        let n = match conn.io.read(&mut self.scratch) {
            Ok(0) => return self.close(epoll, key),
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return
            }
            Err(_) => return self.close(epoll, key),
        };
        let now = Instant::now();
        let outcome = if conn.partial.is_empty() {
            // Whole requests in one read are answered from the read buffer: no copy, no
            // allocation, nothing charged to the pending budget.
            let input = &self.scratch[..n];
            let (used, outcome) = self.responder.answer(conn, input);
            let more = used < n && !conn.close_after_flush;
            if more && matches!(outcome, Outcome::Continue) {
                self.responder.keep_partial(conn, &input[used..]);
            }
            let partial = !conn.partial.is_empty();
            self.timeouts.rearm(&mut conn.clock, partial, true, now);
            outcome
        } else {
            self.responder.keep_partial(conn, &self.scratch[..n]);
            self.process(key, now)
        };
        if let Outcome::Profile {
            seconds,
            flamegraph,
        } = outcome
        {
            return self.hand_off_to_profiler(epoll, key, seconds, flamegraph);
        }
        self.flush(epoll, key);
    }

    /// Answers the complete requests buffered in the connection's partial buffer, in order.
    fn process(&mut self, key: usize, now: Instant) -> Outcome {
        let Some(conn) = self.conns.get_mut(key) else {
            return Outcome::Continue;
        };
        let budget = &self.responder.state.http_conns.pending;
        if conn.close_after_flush {
            // Refused: whatever else it sent is never read.
            conn.partial.release(budget);
            return Outcome::Continue;
        }
        let partial = std::mem::take(&mut conn.partial);
        let (used, outcome) = self.responder.answer(conn, partial.bytes());
        conn.partial = partial;
        let budget = &self.responder.state.http_conns.pending;
        if conn.close_after_flush {
            conn.partial.release(budget);
        } else {
            conn.partial.consume(budget, used);
        }
        let left = !conn.partial.is_empty();
        self.timeouts.rearm(&mut conn.clock, left, used > 0, now);
        outcome
    }

    /// Writes pending replies; answers requests that arrived meanwhile; loops until it has to wait
    /// for the socket (EPOLLOUT) or for more request bytes (EPOLLIN).
    fn flush(&mut self, epoll: &Epoll, key: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let mut written = 0;
            while written < conn.outbuf.len() {
                match conn.io.write(&conn.outbuf[written..]) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return self.close(epoll, key),
                }
            }
            conn.outbuf.drain(..written);
            if !conn.outbuf.is_empty() {
                set_interest(epoll, conn, key, true);
                return;
            }
            // Idle connections hold no buffer.
            conn.outbuf = Vec::new();
            if conn.close_after_flush {
                return self.close(epoll, key);
            }
            set_interest(epoll, conn, key, false);
            if conn.partial.is_empty() {
                return;
            }
            // Requests that arrived while we waited to write are already buffered.
            let pending = conn.partial.len();
            match self.process(key, Instant::now()) {
                Outcome::Profile {
                    seconds,
                    flamegraph,
                } => {
                    return self.hand_off_to_profiler(epoll, key, seconds, flamegraph);
                }
                Outcome::Continue => {
                    let conn = self.conns.get(key).expect("live connection");
                    if conn.outbuf.is_empty() && conn.partial.len() == pending {
                        return; // a partial request: wait for more bytes
                    }
                }
            }
        }
    }

    /// A profile takes seconds: the connection leaves the event loop for a thread of its own, which
    /// answers and closes it. One profile at a time.
    fn hand_off_to_profiler(&mut self, epoll: &Epoll, key: usize, seconds: u64, flamegraph: bool) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        let _ = epoll.delete(conn.io.as_fd());
        let state = self.responder.state.clone();
        // Requests pipelined behind the profile are never answered: the connection closes after it.
        conn.partial.release(&state.http_conns.pending);
        let date = self.responder.date.get().to_string();
        std::thread::spawn(move || {
            // Earlier pipelined replies go out first.
            let _ = set_blocking(&conn.io);
            let _ = conn.io.write_all(&conn.outbuf);
            conn.outbuf.clear();
            let started = Instant::now();
            let response = super::profile::run(seconds, flamegraph);
            write_response(&mut conn.outbuf, &response, false, true, &date);
            routes::observe(
                &state,
                "/debug/pprof/profile",
                response.status,
                started.elapsed().as_secs_f64(),
            );
            let _ = conn.io.write_all(&conn.outbuf);
        });
    }
}

fn set_blocking(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let flags = OFlag::from_bits_truncate(fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

#[cfg(test)]
mod test {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;
    use crate::core::LocalCounter;
    use crate::http::pending::PendingBudget;

    fn start(max_pending: u64) -> (HttpServer, Arc<AppState>, SocketAddr) {
        let counter = Arc::new(LocalCounter::default());
        let state = Arc::new(AppState::new("kernel", serde_json::json!({}), counter));
        state.http_conns.pending.set_limit(max_pending);
        let config = HttpConfig {
            listen: HttpListen::Tcp("127.0.0.1:0".parse().unwrap()),
            access: Access { token: None },
            rate_limit: 0,
            workers: 1,
            cpus: Vec::new(),
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
        };
        let server = HttpServer::start(config, state.clone()).unwrap();
        let HttpListen::Tcp(addr) = server.bound else {
            unreachable!("bound to TCP")
        };
        (server, state, addr)
    }

    /// What a connection got: a status, or nothing yet (still open, waiting for its body).
    fn status(conn: &mut TcpStream) -> Option<u16> {
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut reply = [0u8; 12];
        match conn.read_exact(&mut reply) {
            Ok(()) => std::str::from_utf8(&reply[9..12]).ok()?.parse().ok(),
            Err(_) => None,
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_worker_that_ended_is_noticed_unless_shutting_down() {
        let (mut server, _state, addr) = start(PendingBudget::DEFAULT_LIMIT);
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(status(&mut conn), Some(200));
        assert!(!server.any_worker_finished());
        // A worker thread that returned (as one does after an error or a panic).
        let ended = std::thread::spawn(|| {});
        wait_for("the thread to end", || ended.is_finished());
        server.handles.push(ended);
        assert!(server.any_worker_finished());
        server.stop.store(true, Ordering::Relaxed);
        assert!(
            !server.any_worker_finished(),
            "ending is expected once stopping"
        );
        server.shutdown();
    }

    #[test]
    fn partial_requests_beyond_the_pending_budget_get_503() {
        const LIMIT: u64 = 256 * 1024;
        let (server, state, addr) = start(LIMIT);
        let head = b"POST /counter HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 65536\r\n\r\n";
        // Ten clients each send 60,000 of the 65,536 body bytes they announced, and wait.
        let mut conns: Vec<TcpStream> = (0..10)
            .map(|_| {
                let mut conn = TcpStream::connect(addr).unwrap();
                conn.write_all(head).unwrap();
                conn.write_all(&[b' '; 60_000]).unwrap();
                conn
            })
            .collect();
        let budget = &state.http_conns;
        wait_for("every partial body to be read or refused", || {
            let held = budget.pending.used() / 60_000;
            held + budget.over_budget.load(Ordering::Relaxed) >= 10
        });
        let statuses: Vec<Option<u16>> = conns.iter_mut().map(status).collect();
        let refused = statuses.iter().filter(|s| **s == Some(503)).count();
        let waiting = statuses.iter().filter(|s| s.is_none()).count();
        assert_eq!(refused + waiting, 10, "{statuses:?}");
        // 256 KiB holds four bodies of 60,000 bytes (in buffers of up to 64 KiB), not five.
        assert!((3..=4).contains(&waiting), "{statuses:?}");
        assert_eq!(budget.over_budget.load(Ordering::Relaxed), refused as u64);
        assert!(budget.pending.used() <= LIMIT);
        // Closing the connections gives the budget back; new requests are served again.
        drop(conns);
        wait_for("the budget to be given back", || budget.pending.used() == 0);
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(status(&mut conn), Some(200));
        server.shutdown();
    }
}
