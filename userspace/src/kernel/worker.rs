//! One pinned kernel-datapath worker: its UDP sockets (batched recvmmsg/sendmmsg, replies written in
//! place), its TCP listeners, its share of the Unix listeners, and the stream connections it accepted.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::EventFd;
use slab::Slab;

use crate::core::{Batch, Counter, Protocol, StreamDecoder, Ticket};
use crate::net::{Accepted, Listeners, StreamListener};
use crate::spec::PollMode;
use crate::stats::{DropReason, WorkerStats};
use crate::sys::MmsgBatch;

use super::sockets::WorkerSockets;

const TOKEN_WAKE: u64 = 0;
const TOKEN_UDP: u64 = 1;
const TOKEN_LISTENER: u64 = 1 << 16;
const TOKEN_CONN: u64 = 1 << 32;
/// Batches served from one UDP socket before looking at the others.
const MAX_BATCHES_PER_TURN: usize = 16;
/// Bytes read from a stream connection at once.
const STREAM_READ: usize = 64 * 1024;
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// How often a worker sleeping in recvmmsg looks at the stop flag.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Tuning shared by all workers.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct WorkerConfig {
    pub poll: PollMode,
    pub batch: usize,
    pub max_datagram: usize,
}

/// A stream connection: about 64 bytes while idle (no heap allocation).
struct Conn {
    io: File,
    protocol: Protocol,
    decoder: StreamDecoder,
    /// Replies the kernel would not take yet; while set the connection is not read (backpressure).
    pending: Vec<u8>,
    /// An invalid frame was seen: close once pending replies are flushed.
    closing: bool,
}

pub struct Worker {
    stats: Arc<WorkerStats>,
    counter: Arc<dyn Counter>,
    config: WorkerConfig,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    udp: Vec<(Protocol, std::net::UdpSocket)>,
    listeners: Listeners<Protocol>,
    conns: Slab<Conn>,
    mmsg: MmsgBatch,
    tickets: Vec<Ticket>,
    replies: Vec<(u16, u16)>,
    read_buf: Box<[u8]>,
    write_buf: Box<[u8]>,
    last_error_log: Option<Instant>,
}

impl Worker {
    pub fn new(
        sockets: WorkerSockets,
        stats: Arc<WorkerStats>,
        counter: Arc<dyn Counter>,
        config: WorkerConfig,
        stop: Arc<AtomicBool>,
        wake: Arc<EventFd>,
    ) -> Worker {
        let mut listeners: Vec<(Protocol, StreamListener)> = Vec::new();
        let tcp = sockets.tcp.into_iter();
        listeners.extend(tcp.map(|(p, l)| (p, StreamListener::Tcp(l))));
        let unix = sockets.unix.into_iter();
        listeners.extend(unix.map(|(p, l)| (p, StreamListener::Unix(l))));
        Worker {
            stats,
            counter,
            config,
            stop,
            wake,
            udp: sockets.udp,
            listeners: Listeners::new(listeners, TOKEN_LISTENER),
            conns: Slab::new(),
            mmsg: MmsgBatch::new(config.batch, config.max_datagram),
            tickets: Vec::with_capacity(config.batch),
            replies: Vec::with_capacity(config.batch),
            read_buf: vec![0u8; STREAM_READ].into_boxed_slice(),
            write_buf: vec![0u8; STREAM_READ + 16].into_boxed_slice(),
            last_error_log: None,
        }
    }

    /// Serves until the stop flag is set, then answers what was already received and returns.
    pub fn run(mut self) -> io::Result<()> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            self.wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_WAKE),
        )?;
        let spin = self.config.poll == PollMode::Spin;
        // Spinning workers poll their UDP sockets directly (one syscall per turn); blocking workers
        // wait for them in epoll.
        if !spin {
            for (i, (_, socket)) in self.udp.iter().enumerate() {
                epoll.add(
                    socket.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UDP + i as u64),
                )?;
            }
        }
        self.listeners.register(&epoll)?;
        let has_streams = !self.listeners.is_empty();
        // A blocking worker with one UDP socket and nothing else sleeps in recvmmsg itself: one
        // syscall per wake-up instead of epoll_wait plus recvmmsg. The receive timeout bounds how
        // long it takes to notice the stop flag.
        let direct_wait = !spin && !has_streams && self.udp.len() == 1;
        if direct_wait {
            self.udp[0].1.set_nonblocking(false)?;
            self.udp[0].1.set_read_timeout(Some(STOP_CHECK_INTERVAL))?;
            while !self.stop.load(Ordering::Relaxed) {
                self.serve_udp(0, true);
            }
            self.udp[0].1.set_nonblocking(true)?;
        }
        let mut events = vec![EpollEvent::empty(); 256];

        while !self.stop.load(Ordering::Relaxed) {
            if spin {
                for i in 0..self.udp.len() {
                    self.serve_udp(i, false);
                }
                if !has_streams {
                    continue;
                }
            }
            // A listener paused for lack of descriptors comes back on time.
            self.listeners.resume_due(&epoll);
            let timeout = if spin {
                EpollTimeout::ZERO
            } else {
                self.listeners.wait_timeout(None)
            };
            let n = match epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for event in &events[..n] {
                self.dispatch(&epoll, event.data(), event.events());
            }
        }

        // Shutdown: stop accepting, answer what already arrived, close connections.
        self.listeners.close(&epoll);
        for i in 0..self.udp.len() {
            self.serve_udp(i, false);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.conn_readable(&epoll, key);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(&epoll, key, false);
        }
        Ok(())
    }

    fn dispatch(&mut self, epoll: &Epoll, token: u64, flags: EpollFlags) {
        if token == TOKEN_WAKE {
            let _ = self.wake.read();
        } else if token < TOKEN_LISTENER {
            self.serve_udp((token - TOKEN_UDP) as usize, false);
        } else if token < TOKEN_CONN {
            self.accept(epoll, (token - TOKEN_LISTENER) as usize);
        } else {
            let key = (token - TOKEN_CONN) as usize;
            if flags.contains(EpollFlags::EPOLLOUT) {
                self.conn_writable(epoll, key);
            }
            if flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                self.conn_readable(epoll, key);
            }
        }
    }

    /// Receives batches from one UDP socket and answers them with one counter add per batch.
    fn serve_udp(&mut self, index: usize, wait: bool) {
        let (protocol, ref socket) = self.udp[index];
        let fd = socket.as_raw_fd();
        for turn in 0..MAX_BATCHES_PER_TURN {
            let n = match self.mmsg.recv(fd, wait && turn == 0) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    self.log_error("udp receive", &e);
                    return;
                }
            };
            let mut batch = Batch::new(&self.stats);
            self.tickets.clear();
            for i in 0..n {
                // No reply can be addressed to port 0 (sendto refuses it): count, never answer.
                let zero_port = self.mmsg.source_port(i) == Some(0);
                let (request, truncated) = self.mmsg.datagram(i);
                let ticket = if zero_port {
                    batch.reject(DropReason::ZeroSourcePort, request.len())
                } else if truncated {
                    batch.reject(DropReason::Oversize, request.len())
                } else {
                    batch.admit(protocol, request)
                };
                self.tickets.push(ticket);
            }
            let commit = batch.commit(&*self.counter);
            self.replies.clear();
            for (i, &ticket) in self.tickets.iter().enumerate() {
                if ticket.is_reply() {
                    let (buf, _) = self.mmsg.datagram(i);
                    let len = commit.write_reply_in_place(ticket, buf);
                    self.replies.push((i as u16, len as u16));
                }
            }
            if !self.replies.is_empty() {
                let (sent, bytes, refused) = self.mmsg.send(fd, &self.replies);
                self.stats.replies.add(sent as u64);
                self.stats.tx_bytes.add(bytes as u64);
                self.stats.tx_errors.add(refused as u64);
            }
            if n < self.mmsg.slots() {
                return;
            }
        }
    }

    fn accept(&mut self, epoll: &Epoll, index: usize) {
        let conns = &mut self.conns;
        let stats = &self.stats;
        let mut epoll_error = None;
        let refused = self
            .listeners
            .accept(epoll, index, 64, |protocol, accepted| {
                let Accepted { fd, .. } = accepted;
                let entry = conns.vacant_entry();
                let token = TOKEN_CONN + entry.key() as u64;
                let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
                if let Err(e) = epoll.add(fd.as_fd(), EpollEvent::new(interest, token)) {
                    epoll_error = Some(e);
                    return;
                }
                entry.insert(Conn {
                    io: File::from(fd),
                    protocol,
                    decoder: StreamDecoder::default(),
                    pending: Vec::new(),
                    closing: false,
                });
                stats.conns_opened.add(1);
            });
        self.stats.conns_refused.add(refused);
        if let Some(e) = epoll_error {
            self.log_error("epoll add", &e.into());
        }
    }

    fn conn_readable(&mut self, epoll: &Epoll, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if !conn.pending.is_empty() {
            // Backpressure: the peer is not reading its replies, so stop reading its requests.
            return;
        }
        let n = match conn.io.read(&mut self.read_buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(_) => {
                self.close(epoll, key, true);
                return;
            }
        };
        if n == 0 {
            self.close(epoll, key, true);
            return;
        }
        let output = conn.decoder.feed(
            conn.protocol,
            &self.read_buf[..n],
            &mut self.write_buf,
            &self.stats,
            &*self.counter,
        );
        self.stats.replies.add(u64::from(output.replies));
        if output.error.is_some() {
            conn.closing = true;
            self.stats.conns_rejected.add(1);
        }
        let reply = &self.write_buf[..output.reply_len];
        match write_nonblocking(&mut conn.io, reply) {
            Ok(written) => {
                self.stats.tx_bytes.add(written as u64);
                if written < reply.len() {
                    conn.pending = reply[written..].to_vec();
                    let mut ev = EpollEvent::new(EpollFlags::EPOLLOUT, TOKEN_CONN + key as u64);
                    let _ = epoll.modify(conn.io.as_fd(), &mut ev);
                } else if conn.closing {
                    self.close(epoll, key, false);
                }
            }
            Err(_) => self.close(epoll, key, false),
        }
    }

    fn conn_writable(&mut self, epoll: &Epoll, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.pending.is_empty() {
            return;
        }
        match write_nonblocking(&mut conn.io, &conn.pending) {
            Ok(written) => {
                self.stats.tx_bytes.add(written as u64);
                conn.pending.drain(..written);
                if conn.pending.is_empty() {
                    // Give the buffer back: idle connections hold no heap memory.
                    conn.pending = Vec::new();
                    if conn.closing {
                        self.close(epoll, key, false);
                        return;
                    }
                    let mut ev = EpollEvent::new(
                        EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
                        TOKEN_CONN + key as u64,
                    );
                    let _ = epoll.modify(conn.io.as_fd(), &mut ev);
                }
            }
            Err(_) => self.close(epoll, key, false),
        }
    }

    /// Closes a connection. `at_eof`: the peer ended it, so a partial frame it left is counted.
    fn close(&mut self, epoll: &Epoll, key: usize, at_eof: bool) {
        let Some(conn) = self.conns.try_remove(key) else {
            return;
        };
        if at_eof && conn.decoder.pending() > 0 && !conn.closing {
            self.stats.requests.add(1);
            self.stats.count_drop(DropReason::WrongLength);
        }
        let _ = epoll.delete(conn.io.as_fd());
        self.stats.conns_closed.add(1);
    }

    fn log_error(&mut self, what: &str, error: &io::Error) {
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|last| now.duration_since(last) >= ERROR_LOG_INTERVAL)
        {
            self.last_error_log = Some(now);
            tracing::warn!("{what}: {error} (further errors of this worker muted for 5 s)");
        }
    }
}

/// Writes as much as the socket takes without blocking.
fn write_nonblocking(io: &mut File, mut bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while !bytes.is_empty() {
        match io.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                bytes = &bytes[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}
