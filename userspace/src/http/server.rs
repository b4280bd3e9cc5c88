//! The HTTP/1.1 server: its own worker threads, each an epoll loop over its SO_REUSEPORT listener (or
//! a share of the Unix listener) and its connections. Keep-alive and pipelining; requests parsed by
//! the sans-IO parser in request.rs, which enforces the limits on the request head and body;
//! header-read and idle timeouts; a per-source rate limit; graceful shutdown. An idle connection
//! holds no buffer.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use slab::Slab;

use super::request::{self, Parse};
use super::routes::{self, Access, Request, Response, Routed};
use super::state::AppState;
use crate::kernel::{self, UnixEndpoint};
use crate::spec::CpuId;
use crate::sys;

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

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(Arc<UnixEndpoint>),
}

impl HttpServer {
    pub fn start(config: HttpConfig, state: Arc<AppState>) -> Result<HttpServer> {
        let n = config.workers.max(1);
        let (listeners, bound): (Vec<Listener>, HttpListen) = match &config.listen {
            HttpListen::Tcp(addr) => {
                let ls = kernel::bind_tcp_listeners(&format!("--http {addr}"), *addr, n)?;
                let local = ls[0].local_addr()?;
                (
                    ls.into_iter().map(Listener::Tcp).collect(),
                    HttpListen::Tcp(local),
                )
            }
            HttpListen::Unix(path) => {
                let endpoint = Arc::new(kernel::bind_unix(
                    &format!("--http unix://{}", path.display()),
                    path,
                )?);
                (
                    (0..n).map(|_| Listener::Unix(endpoint.clone())).collect(),
                    config.listen.clone(),
                )
            }
        };
        let limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>> =
            NonZeroU32::new(config.rate_limit)
                .map(|rate| Arc::new(RateLimiter::keyed(Quota::per_second(rate))));
        let stop = Arc::new(AtomicBool::new(false));
        let mut wakes = Vec::new();
        let mut handles = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let wake = Arc::new(EventFd::from_flags(
                EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
            )?);
            let worker = HttpWorker {
                state: state.clone(),
                access: config.access.clone(),
                limiter: limiter.clone(),
                listener: Some(listener),
                conns: Slab::new(),
                wake: wake.clone(),
                stop: stop.clone(),
                header_timeout: config.header_timeout,
                idle_timeout: config.idle_timeout,
                scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
                date: HttpDate::default(),
                metrics: routes::MetricsCache::new(i as u32),
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

    /// Stops accepting, lets in-flight requests finish (at most `deadline`), closes everything.
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

/// How long in-flight requests may take once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

struct Conn {
    io: File,
    /// None for Unix-socket peers (exempt from the per-source limit: they are local).
    peer: Option<IpAddr>,
    local: bool,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// When the connection times out: header timeout while a request is partly read, idle otherwise.
    deadline: Instant,
    close_after_flush: bool,
    /// Registered for EPOLLOUT (replies waiting) rather than EPOLLIN.
    writing: bool,
}

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

/// The Date header value, formatted once per second.
#[derive(Default)]
struct HttpDate {
    second: u64,
    text: String,
}

impl HttpDate {
    fn get(&mut self) -> &str {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        &self.text
    }
}

struct HttpWorker {
    state: Arc<AppState>,
    access: Access,
    limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    listener: Option<Listener>,
    conns: Slab<Conn>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    header_timeout: Duration,
    idle_timeout: Duration,
    scratch: Box<[u8]>,
    date: HttpDate,
    metrics: routes::MetricsCache,
}

impl HttpWorker {
    fn run(mut self) -> io::Result<()> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            self.wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_WAKE),
        )?;
        match self.listener.as_ref().expect("set at start") {
            Listener::Tcp(l) => epoll.add(
                l.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LISTENER),
            )?,
            Listener::Unix(u) => epoll.add(
                u.listener.as_fd(),
                EpollEvent::new(
                    EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE,
                    TOKEN_LISTENER,
                ),
            )?,
        }
        let mut events = vec![EpollEvent::empty(); 256];
        let mut last_sweep = Instant::now();
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            let n = match epoll.wait(&mut events, EpollTimeout::from(250u16)) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                    }
                    TOKEN_LISTENER => self.accept(&epoll),
                    key => {
                        let key = key as usize;
                        if event.events().contains(EpollFlags::EPOLLOUT) {
                            self.flush(&epoll, key);
                        }
                        if event.events().intersects(
                            EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR,
                        ) {
                            self.readable(&epoll, key);
                        }
                    }
                }
            }
            let now = Instant::now();
            if now.duration_since(last_sweep) >= Duration::from_secs(1) {
                last_sweep = now;
                self.sweep(&epoll, now);
            }
            if self.stop.load(Ordering::Relaxed) {
                // Graceful shutdown: stop accepting, let requests in flight finish, then close.
                if let Some(listener) = self.listener.take() {
                    let fd = match &listener {
                        Listener::Tcp(l) => l.as_fd(),
                        Listener::Unix(u) => u.listener.as_fd(),
                    };
                    let _ = epoll.delete(fd);
                }
                let deadline = *shutdown_deadline.get_or_insert(now + SHUTDOWN_GRACE);
                let busy = self
                    .conns
                    .iter()
                    .any(|(_, c)| !c.inbuf.is_empty() || !c.outbuf.is_empty());
                if !busy || now >= deadline {
                    return Ok(());
                }
            }
        }
    }

    fn accept(&mut self, epoll: &Epoll) {
        for _ in 0..64 {
            let accepted: io::Result<(OwnedFd, Option<IpAddr>)> = match self.listener.as_ref() {
                Some(Listener::Tcp(l)) => l.accept().map(|(s, addr)| {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_nonblocking(true);
                    (s.into(), Some(addr.ip()))
                }),
                Some(Listener::Unix(u)) => u.listener.accept().map(|(s, _)| {
                    let _ = s.set_nonblocking(true);
                    (s.into(), None)
                }),
                None => return,
            };
            let (fd, peer) = match accepted {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let entry = self.conns.vacant_entry();
            let key = entry.key() as u64;
            if epoll
                .add(
                    fd.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, key),
                )
                .is_err()
            {
                continue;
            }
            entry.insert(Conn {
                io: File::from(fd),
                peer,
                local: peer.is_none_or(|ip| ip.is_loopback()),
                inbuf: Vec::new(),
                outbuf: Vec::new(),
                deadline: Instant::now() + self.idle_timeout,
                close_after_flush: false,
                writing: false,
            });
        }
    }

    fn close(&mut self, epoll: &Epoll, key: usize) {
        if let Some(conn) = self.conns.try_remove(key) {
            let _ = epoll.delete(conn.io.as_fd());
        }
    }

    /// Closes connections past their deadline: a partly read request gets 408 first.
    fn sweep(&mut self, epoll: &Epoll, now: Instant) {
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            let date = self.date.get().to_string();
            if let Some(conn) = self.conns.get_mut(key) {
                if !conn.inbuf.is_empty() {
                    let r = Response::error(408, "the request was not received in time");
                    write_response(&mut conn.outbuf, &r, false, true, &date);
                    let _ = conn.io.write(&conn.outbuf);
                }
            }
            self.close(epoll, key);
        }
        if let Some(limiter) = &self.limiter {
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
            Ok(0) => {
                self.close(epoll, key);
                return;
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return
            }
            Err(_) => {
                self.close(epoll, key);
                return;
            }
        };
        conn.inbuf.extend_from_slice(&self.scratch[..n]);
        if let Outcome::Profile {
            seconds,
            flamegraph,
        } = self.process(key)
        {
            self.hand_off_to_profiler(epoll, key, seconds, flamegraph);
            return;
        }
        self.flush(epoll, key);
    }

    /// Answers every complete request in the connection's buffer, in order.
    fn process(&mut self, key: usize) -> Outcome {
        let date = self.date.get();
        let conn = self.conns.get_mut(key).expect("live connection");
        let mut consumed = 0;
        let mut outcome = Outcome::Continue;
        while consumed < conn.inbuf.len() && !conn.close_after_flush {
            let started = Instant::now();
            let (head, len) = match request::parse(&conn.inbuf[consumed..]) {
                Parse::Partial => break,
                Parse::Reject { status, message } => {
                    reject(conn, status, message, date, &self.state);
                    break;
                }
                Parse::Complete { head, len } => (head, len),
            };
            let route = routes::route_label(head.path);
            let limited = match (&self.limiter, conn.peer) {
                (Some(limiter), Some(ip)) => limiter.check_key(&ip).is_err(),
                _ => false,
            };
            let response = if limited {
                Response::error(429, "rate limit exceeded for this source: slow down")
            } else {
                let request = Request {
                    method: head.method,
                    path: head.path,
                    query: head.query,
                    content_type: head.content_type,
                    authorization: head.authorization,
                    body: head.body,
                    local_peer: conn.local,
                };
                match routes::route(&request, &self.state, &self.access) {
                    Routed::Respond(r) => r,
                    Routed::Profile {
                        seconds,
                        flamegraph,
                    } => {
                        consumed += len;
                        outcome = Outcome::Profile {
                            seconds,
                            flamegraph,
                        };
                        break;
                    }
                }
            };
            write_response(
                &mut conn.outbuf,
                &response,
                head.head_only,
                head.close,
                date,
            );
            self.metrics.observe(
                &self.state,
                route,
                response.status,
                started.elapsed().as_secs_f64(),
            );
            consumed += len;
            if head.close {
                conn.close_after_flush = true;
            }
        }
        conn.inbuf.drain(..consumed);
        conn.deadline = Instant::now()
            + if conn.inbuf.is_empty() {
                self.idle_timeout
            } else {
                self.header_timeout
            };
        if conn.inbuf.is_empty() && conn.inbuf.capacity() > 0 {
            // Idle connections hold no buffer.
            conn.inbuf = Vec::new();
        }
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
                    Err(_) => {
                        self.close(epoll, key);
                        return;
                    }
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
                self.close(epoll, key);
                return;
            }
            set_interest(epoll, conn, key, false);
            if conn.inbuf.is_empty() {
                return;
            }
            // Requests that arrived while we waited to write are already buffered.
            let pending = conn.inbuf.len();
            match self.process(key) {
                Outcome::Profile {
                    seconds,
                    flamegraph,
                } => {
                    self.hand_off_to_profiler(epoll, key, seconds, flamegraph);
                    return;
                }
                Outcome::Continue => {
                    let conn = self.conns.get(key).expect("live connection");
                    if conn.outbuf.is_empty() && conn.inbuf.len() == pending {
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
        let state = self.state.clone();
        let date = self.date.get().to_string();
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

enum Outcome {
    Continue,
    Profile { seconds: u64, flamegraph: bool },
}

/// Answers an unusable request with `status` and closes the connection after the reply.
fn reject(conn: &mut Conn, status: u16, message: &str, date: &str, state: &AppState) {
    write_response(
        &mut conn.outbuf,
        &Response::error(status, message),
        false,
        true,
        date,
    );
    routes::observe(state, "other", status, 0.0);
    conn.close_after_flush = true;
}

/// Serializes a response (status line, headers, body) onto `out`, without `fmt` on the hot path.
pub fn write_response(out: &mut Vec<u8>, r: &Response, head_only: bool, close: bool, date: &str) {
    let body = r.body.bytes();
    let mut digits = [0u8; 20];
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(crate::wire::decimal(u64::from(r.status), &mut digits));
    out.push(b' ');
    out.extend_from_slice(routes::reason_phrase(r.status).as_bytes());
    out.extend_from_slice(b"\r\nServer: ricochet\r\nDate: ");
    out.extend_from_slice(date.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(r.content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    out.extend_from_slice(crate::wire::decimal(body.len() as u64, &mut digits));
    out.extend_from_slice(b"\r\n");
    if let Some(extra) = r.extra_header {
        out.extend_from_slice(extra.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::http::routes::Body;

    #[test]
    fn response_head_is_well_formed() {
        let mut out = Vec::new();
        let r = Response {
            status: 404,
            content_type: "application/json",
            body: Body::Static(b"{}"),
            extra_header: Some("Allow: GET"),
        };
        write_response(&mut out, &r, false, true, "Sun, 22 Nov 2026 15:00:00 GMT");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nServer: ricochet\r\nDate: Sun, 22 Nov 2026 15:00:00 GMT\r\nContent-Type: application/json\r\nContent-Length: 2\r\nAllow: GET\r\nConnection: close\r\n\r\n{}"
        );
    }
}
