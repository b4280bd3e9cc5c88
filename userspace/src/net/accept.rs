//! Accepting stream connections, shared by the kernel datapath and the HTTP server: a worker's
//! listeners, their epoll registration, and an accept loop that survives running out of file
//! descriptors.
//!
//! Out of descriptors, `accept` fails with EMFILE (or ENFILE, ENOBUFS, ENOMEM) and leaves the
//! connection in the backlog, so a level-triggered epoll reports the listener again at once: the
//! worker spins at 100 % while the client waits for nothing. The standard way out (libev, nginx,
//! Node) is a reserve descriptor: close it, accept the connection into the freed slot, close the
//! connection at once (the client sees its connection closed instead of hanging) and reopen the
//! reserve. Each such refusal is counted. When even the reserve cannot be reopened, the listener
//! leaves epoll for [`PAUSE`] instead of being polled in a loop.
//!
//! The reserve is one per process and every accept holds its lock: a worker accepting at the same
//! time could otherwise take the descriptor freed for a refusal, and the worker that freed it
//! would be left without a reserve and its backlog hanging (measured: a third of 300 connections
//! left waiting with four workers). Accepting is not the packet path; the lock is taken once per
//! batch of accepts and is uncontended but for simultaneous connection bursts.

use std::fs::File;
use std::io;
use std::net::{IpAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags, EpollTimeout};

use super::bind::UnixEndpoint;

/// How long a listener stays out of epoll when connections can neither be accepted nor refused.
pub const PAUSE: Duration = Duration::from_millis(100);
/// Accept errors are logged at most this often, for the whole process.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// A listening stream socket.
#[derive(Debug)]
pub enum StreamListener {
    Tcp(TcpListener),
    /// Shared by several workers: EPOLLEXCLUSIVE wakes one of them per connection.
    Unix(Arc<UnixEndpoint>),
}

impl StreamListener {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            StreamListener::Tcp(l) => l.as_fd(),
            StreamListener::Unix(u) => u.listener.as_fd(),
        }
    }

    fn epoll_flags(&self) -> EpollFlags {
        match self {
            StreamListener::Tcp(_) => EpollFlags::EPOLLIN,
            StreamListener::Unix(_) => EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE,
        }
    }

    /// One non-blocking connection (TCP_NODELAY on TCP), with the peer's address for TCP.
    fn accept(&self) -> io::Result<Accepted> {
        match self {
            StreamListener::Tcp(l) => l.accept().map(|(s, addr)| {
                let _ = s.set_nodelay(true);
                let _ = s.set_nonblocking(true);
                Accepted {
                    fd: s.into(),
                    peer: Some(addr.ip()),
                }
            }),
            StreamListener::Unix(u) => u.listener.accept().map(|(s, _)| {
                let _ = s.set_nonblocking(true);
                Accepted {
                    fd: s.into(),
                    peer: None,
                }
            }),
        }
    }
}

/// A connection accepted and set non-blocking.
#[derive(Debug)]
pub struct Accepted {
    pub fd: OwnedFd,
    /// The peer's IP address; None on Unix sockets.
    pub peer: Option<IpAddr>,
}

/// How an accept error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptError {
    /// The backlog is empty.
    Drained,
    /// This connection failed (aborted by its peer, a signal): try the next one.
    Retry,
    /// Out of descriptors or socket memory: refuse the connection through the reserve.
    Exhausted,
    /// Anything else: log it and stop polling the listener for a while.
    Other,
}

fn classify(error: &io::Error) -> AcceptError {
    match error.raw_os_error() {
        Some(libc::EAGAIN) => AcceptError::Drained,
        Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO | libc::EPERM) => AcceptError::Retry,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Exhausted,
        _ => AcceptError::Other,
    }
}

struct Entry<P> {
    payload: P,
    socket: StreamListener,
    /// Out of epoll until then (see [`PAUSE`]).
    resume_at: Option<Instant>,
}

/// One worker's listeners, each with a payload `P` (what the worker serves on it), registered in
/// the worker's epoll under tokens `token_base + index`.
pub struct Listeners<P> {
    entries: Vec<Entry<P>>,
    token_base: u64,
    paused: usize,
}

impl<P: Copy> Listeners<P> {
    pub fn new(listeners: Vec<(P, StreamListener)>, token_base: u64) -> Listeners<P> {
        if !listeners.is_empty() {
            let mut reserve = lock_reserve();
            if reserve.is_none() {
                *reserve = open_reserve();
            }
        }
        Listeners {
            entries: listeners
                .into_iter()
                .map(|(payload, socket)| Entry {
                    payload,
                    socket,
                    resume_at: None,
                })
                .collect(),
            token_base,
            paused: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The listener index of an epoll token, if it is one of ours.
    pub fn index_of(&self, token: u64) -> Option<usize> {
        let index = usize::try_from(token.checked_sub(self.token_base)?).ok()?;
        (index < self.entries.len()).then_some(index)
    }

    /// Adds every listener to `epoll`.
    pub fn register(&self, epoll: &Epoll) -> io::Result<()> {
        for index in 0..self.entries.len() {
            self.add(epoll, index)?;
        }
        Ok(())
    }

    fn add(&self, epoll: &Epoll, index: usize) -> io::Result<()> {
        let socket = &self.entries[index].socket;
        let event = EpollEvent::new(socket.epoll_flags(), self.token_base + index as u64);
        epoll.add(socket.fd(), event).map_err(io::Error::from)
    }

    /// Stops accepting: every listener leaves epoll and is closed (graceful shutdown).
    pub fn close(&mut self, epoll: &Epoll) {
        for entry in self.entries.drain(..) {
            if entry.resume_at.is_none() {
                let _ = epoll.delete(entry.socket.fd());
            }
        }
        self.paused = 0;
    }
}

impl<P: Copy> Listeners<P> {
    /// Accepts up to `max` connections from listener `index`, handing each to `on_conn`. Returns
    /// how many were refused because the process was out of descriptors.
    pub fn accept(
        &mut self,
        epoll: &Epoll,
        index: usize,
        max: usize,
        mut on_conn: impl FnMut(P, Accepted),
    ) -> u64 {
        let Some(entry) = self.entries.get(index) else {
            return 0;
        };
        if entry.resume_at.is_some() {
            return 0;
        }
        let mut reserve = lock_reserve();
        let mut refused = 0;
        for _ in 0..max {
            let entry = &self.entries[index];
            let error = match entry.socket.accept() {
                Ok(conn) => {
                    on_conn(entry.payload, conn);
                    continue;
                }
                Err(e) => e,
            };
            match classify(&error) {
                AcceptError::Drained => break,
                AcceptError::Retry => {}
                AcceptError::Exhausted => {
                    log_accept_error(&error, "out of file descriptors or socket memory: refusing new connections; raise the open-file limit (ulimit -n, LimitNOFILE=)");
                    match refuse_one(&entry.socket, &mut reserve) {
                        Some(true) => refused += 1,
                        Some(false) => break,
                        None => {
                            self.pause(epoll, index);
                            break;
                        }
                    }
                }
                AcceptError::Other => {
                    log_accept_error(&error, "not accepting on this listener for 100 ms");
                    self.pause(epoll, index);
                    break;
                }
            }
        }
        refused
    }

    fn pause(&mut self, epoll: &Epoll, index: usize) {
        let entry = &mut self.entries[index];
        if entry.resume_at.is_none() {
            let _ = epoll.delete(entry.socket.fd());
            entry.resume_at = Some(Instant::now() + PAUSE);
            self.paused += 1;
        }
    }

    /// Puts paused listeners whose pause is over back into epoll. Cheap when none is paused.
    pub fn resume_due(&mut self, epoll: &Epoll) {
        if self.paused == 0 {
            return;
        }
        let now = Instant::now();
        for index in 0..self.entries.len() {
            if self.entries[index].resume_at.is_some_and(|at| now >= at) {
                self.entries[index].resume_at = None;
                self.paused -= 1;
                let mut reserve = lock_reserve();
                if reserve.is_none() {
                    *reserve = open_reserve();
                }
                if self.add(epoll, index).is_err() {
                    // Try again after another pause rather than lose the listener.
                    self.entries[index].resume_at = Some(now + PAUSE);
                    self.paused += 1;
                }
            }
        }
    }

    /// How long epoll may sleep: `otherwise` (None: until an event), cut short so that a paused
    /// listener is put back on time.
    pub fn wait_timeout(&self, otherwise: Option<Duration>) -> EpollTimeout {
        let next = (self.paused > 0)
            .then(|| self.entries.iter().filter_map(|e| e.resume_at).min())
            .flatten();
        // Rounded up to whole milliseconds, so the wait never ends just before the resume time.
        let until_resume = next.map(|at| {
            let left = at.saturating_duration_since(Instant::now());
            Duration::from_millis(left.as_millis() as u64 + 1)
        });
        let wait = match (otherwise, until_resume) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match wait {
            None => EpollTimeout::NONE,
            Some(d) => EpollTimeout::try_from(d).unwrap_or(EpollTimeout::MAX),
        }
    }
}

/// Refuses the connection at the head of `listener`'s backlog through the reserve descriptor.
/// Some(true): one refused; Some(false): the backlog was empty; None: no reserve to spare.
fn refuse_one(listener: &StreamListener, reserve: &mut Option<File>) -> Option<bool> {
    // Freeing the reserve gives accept one descriptor to use.
    drop(reserve.take());
    let outcome = match listener.accept() {
        // Closing at once: the client sees its connection end instead of waiting in the backlog.
        Ok(_) => Some(true),
        Err(e) if classify(&e) == AcceptError::Drained => Some(false),
        Err(_) => None,
    };
    *reserve = open_reserve();
    // Without a reserve the next refusal is impossible: the caller pauses the listener.
    reserve.as_ref()?;
    outcome
}

/// The process's reserve descriptor; holding the guard is holding the accept lock.
fn lock_reserve() -> MutexGuard<'static, Option<File>> {
    static RESERVE: Mutex<Option<File>> = Mutex::new(None);
    // A panic elsewhere while holding it leaves the Option intact: keep using it.
    RESERVE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_reserve() -> Option<File> {
    File::open("/dev/null").ok()
}

/// Logs an accept error unless one was logged, by any worker, in the last [`LOG_INTERVAL`].
fn log_accept_error(error: &io::Error, what_next: &str) {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    static LAST_MS: AtomicU64 = AtomicU64::new(u64::MAX);
    let epoch = *EPOCH.get_or_init(Instant::now);
    let now_ms = epoch.elapsed().as_millis() as u64;
    let last = LAST_MS.load(Ordering::Relaxed);
    let due = last == u64::MAX || now_ms.saturating_sub(last) >= LOG_INTERVAL.as_millis() as u64;
    if due
        && LAST_MS
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!("accept: {error}: {what_next} (further accept errors muted for 5 s)");
    }
}

#[cfg(test)]
mod test {
    use std::io::Read;
    use std::net::TcpStream;

    use nix::sys::epoll::EpollCreateFlags;

    use super::*;

    fn tcp_listener() -> (StreamListener, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        (StreamListener::Tcp(listener), addr)
    }

    #[test]
    fn accept_errors_are_classified() {
        let kind = |errno| classify(&io::Error::from_raw_os_error(errno));
        assert_eq!(kind(libc::EAGAIN), AcceptError::Drained);
        assert_eq!(kind(libc::ECONNABORTED), AcceptError::Retry);
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(kind(errno), AcceptError::Exhausted);
        }
        assert_eq!(kind(libc::EINVAL), AcceptError::Other);
    }

    #[test]
    fn connections_are_accepted_with_their_payload_and_tokens_map_back() {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        let (listener, addr) = tcp_listener();
        let mut listeners = Listeners::new(vec![(7u8, listener)], 100);
        listeners.register(&epoll).unwrap();
        assert_eq!(
            (listeners.index_of(100), listeners.index_of(101)),
            (Some(0), None)
        );
        assert_eq!(listeners.index_of(99), None);
        let _clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut accepted = Vec::new();
        let refused = listeners.accept(&epoll, 0, 64, |payload, conn| {
            accepted.push((payload, conn.peer));
        });
        assert_eq!(refused, 0);
        assert_eq!(accepted.len(), 3);
        assert!(accepted
            .iter()
            .all(|(p, peer)| *p == 7 && *peer == Some(addr.ip())));
        listeners.close(&epoll);
        assert!(listeners.is_empty());
    }

    #[test]
    fn a_refused_connection_is_closed_and_the_reserve_reopened() {
        let (listener, addr) = tcp_listener();
        let mut client = TcpStream::connect(addr).unwrap();
        let mut reserve = open_reserve();
        assert_eq!(refuse_one(&listener, &mut reserve), Some(true));
        assert!(reserve.is_some());
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        let ended = match client.read(&mut byte) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        };
        assert!(ended, "the refused client's connection is still open");
        assert_eq!(refuse_one(&listener, &mut reserve), Some(false));
    }

    #[test]
    fn a_failing_listener_leaves_epoll_for_a_pause_then_comes_back() {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        // Bound but never listening: accept fails with EINVAL, every time.
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener = StreamListener::Tcp(TcpListener::from(socket));
        let mut listeners = Listeners::new(vec![((), listener)], 0);
        listeners.register(&epoll).unwrap();
        assert_eq!(listeners.wait_timeout(None), EpollTimeout::NONE);
        assert_eq!(listeners.accept(&epoll, 0, 64, |(), _| {}), 0);
        assert_eq!(listeners.paused, 1);
        // Paused: epoll waits at most until the pause ends, however long it would wait otherwise.
        let timeout = Duration::try_from(listeners.wait_timeout(None)).unwrap();
        assert!(timeout > Duration::ZERO && timeout <= PAUSE + Duration::from_millis(1));
        let timeout = listeners.wait_timeout(Some(Duration::from_millis(10)));
        assert_eq!(
            Duration::try_from(timeout).unwrap(),
            Duration::from_millis(10)
        );
        listeners.resume_due(&epoll);
        assert_eq!(listeners.paused, 1, "resumed before the pause ended");
        std::thread::sleep(PAUSE);
        listeners.resume_due(&epoll);
        assert_eq!(listeners.paused, 0);
        assert_eq!(listeners.wait_timeout(None), EpollTimeout::NONE);
    }
}
