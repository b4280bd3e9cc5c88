//! Binding listening sockets, shared by the kernel datapath and the HTTP server: SO_REUSEPORT
//! groups of UDP and TCP sockets (one per worker) and Unix listeners that replace a stale socket
//! file and remove theirs when dropped. All errors here happen at start-up and say what to do.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

/// Receive buffer asked for on UDP sockets, so bursts survive a descheduled worker.
const UDP_RCVBUF: usize = 4 << 20;
const TCP_BACKLOG: i32 = 4096;

/// A Unix listener whose socket file is removed when the last worker lets go of it.
#[derive(Debug)]
pub struct UnixEndpoint {
    pub listener: UnixListener,
    path: PathBuf,
}

impl Drop for UnixEndpoint {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                // After the privilege drop the directory may not be writable any more: say so (a
                // stale file is replaced at the next start).
                tracing::warn!("cannot remove the socket file {}: {e}", self.path.display());
            }
            _ => {}
        }
    }
}

/// Binds `n` UDP sockets sharing `addr` with SO_REUSEPORT, non-blocking, with a large receive
/// buffer. `label` names the listener in error messages. Returns them and the address bound (port 0
/// resolved).
pub fn bind_udp_group(
    label: &str,
    addr: SocketAddr,
    n: usize,
) -> Result<(Vec<UdpSocket>, SocketAddr)> {
    let sockets = bind_reuseport(label, addr, Type::DGRAM, n)?;
    let local = local_inet_addr(&sockets[0])?;
    Ok((sockets.into_iter().map(UdpSocket::from).collect(), local))
}

/// Binds `n` listening TCP sockets sharing `addr` with SO_REUSEPORT, non-blocking. `label` names
/// the listener in error messages. Returns them and the address bound (port 0 resolved).
pub fn bind_tcp_group(
    label: &str,
    addr: SocketAddr,
    n: usize,
) -> Result<(Vec<TcpListener>, SocketAddr)> {
    let sockets = bind_reuseport(label, addr, Type::STREAM, n)?;
    let local = local_inet_addr(&sockets[0])?;
    Ok((sockets.into_iter().map(TcpListener::from).collect(), local))
}

fn local_inet_addr(socket: &Socket) -> Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .context("a bound inet socket has no inet address")
}

fn new_inet_socket(addr: SocketAddr, ty: Type) -> io::Result<Socket> {
    let proto = if ty == Type::DGRAM {
        SockProtocol::UDP
    } else {
        SockProtocol::TCP
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    if ty == Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    Ok(socket)
}

/// Binds `n` SO_REUSEPORT sockets on one address. The kernel spreads flows across them by hash.
fn bind_reuseport(spec: &str, addr: SocketAddr, ty: Type, n: usize) -> Result<Vec<Socket>> {
    let explain = |e: io::Error| bind_error(spec, e);
    // SO_REUSEPORT lets a second process of the same user join our port silently. Bind once without
    // it first, so a port already held by anyone (another ricochet included) is reported.
    if addr.port() != 0 {
        let probe = new_inet_socket(addr, ty).map_err(explain)?;
        probe.bind(&addr.into()).map_err(explain)?;
    }
    let mut sockets = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let socket = new_inet_socket(addr, ty).map_err(explain)?;
        socket.set_reuse_port(true).map_err(explain)?;
        if ty == Type::DGRAM {
            // Best effort: the kernel caps it at net.core.rmem_max.
            let _ = socket.set_recv_buffer_size(UDP_RCVBUF);
        }
        socket.bind(&addr.into()).map_err(explain)?;
        if ty == Type::STREAM {
            socket.listen(TCP_BACKLOG).map_err(explain)?;
        }
        // With port 0 the first socket picks the port; the others must join that one.
        addr = socket.local_addr()?.as_socket().expect("inet socket");
        sockets.push(socket);
    }
    Ok(sockets)
}

fn bind_error(spec: &str, e: io::Error) -> anyhow::Error {
    let hint = match e.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            "address already in use: stop the process holding it or pick another port"
        }
        Some(libc::EADDRNOTAVAIL) => {
            "no interface of this machine has that address: use one it has, or 0.0.0.0"
        }
        Some(libc::EACCES) => {
            "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE"
        }
        Some(libc::EAFNOSUPPORT) => "this address family is not supported by the kernel",
        _ => "cannot bind",
    };
    anyhow::Error::new(e).context(format!("{spec}: {hint}"))
}

/// Binds a Unix stream listener, replacing a stale socket file left by a dead instance.
pub fn bind_unix(spec: &str, path: &Path) -> Result<UnixEndpoint> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                bail!(
                    "{spec}: {} exists and is not a socket: remove it or choose another path",
                    path.display()
                );
            }
            match UnixStream::connect(path) {
                Ok(_) => bail!(
                    "{spec}: another process is listening on {}: stop it or choose another path",
                    path.display()
                ),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    // Nobody listens: a stale file from a dead instance.
                    std::fs::remove_file(path).with_context(|| {
                        format!("{spec}: cannot remove stale socket {}", path.display())
                    })?;
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "{spec}: cannot tell whether {} is in use",
                        path.display()
                    )))
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("{spec}: cannot inspect {}", path.display()))
            )
        }
    }
    let listener = UnixListener::bind(path).with_context(|| {
        format!(
            "{spec}: cannot create socket {} (does its directory exist and is it writable?)",
            path.display()
        )
    })?;
    listener.set_nonblocking(true)?;
    Ok(UnixEndpoint {
        listener,
        path: path.to_path_buf(),
    })
}
