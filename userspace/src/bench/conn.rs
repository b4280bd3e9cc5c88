//! The client's sockets: opening UDP, TCP and Unix connections to the target (spread over source
//! addresses), replacing a UDP socket, and holding connections idle for memory benchmarks.

use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result};

use super::args::BenchArgs;
use crate::spec::Transport;

/// One client connection.
pub(super) enum Conn {
    Udp(UdpSocket),
    Stream(File),
}

impl Conn {
    pub(super) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Conn::Udp(s) => s.as_fd(),
            Conn::Stream(f) => f.as_fd(),
        }
    }

    /// Makes reads block for at most `timeout` (writes block too; requests are small).
    pub(super) fn set_blocking_with_timeout(&self, timeout: Duration) -> Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let fd = self.fd();
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
        let tv = nix::sys::time::TimeVal::new(0, timeout.as_micros() as _);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    pub(super) fn is_stream(&self) -> bool {
        matches!(self, Conn::Stream(_))
    }
}

/// Opens `--connections` sockets or connections to the target, spread over `--sources`.
pub(super) fn open_connections(args: &BenchArgs) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(args.connections as usize);
    for i in 0..args.connections as usize {
        let source = (!args.sources.is_empty()).then(|| args.sources[i % args.sources.len()]);
        let conn = match &args.target.transport {
            Transport::Udp(addr) => {
                let local: SocketAddr = match (source, addr) {
                    (Some(ip), _) => SocketAddr::new(ip, 0),
                    (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().expect("literal"),
                    (None, SocketAddr::V6(_)) => "[::]:0".parse().expect("literal"),
                };
                Conn::Udp(udp_connect(local, *addr).with_context(|| {
                    format!("cannot open a UDP socket on {local} towards {addr}")
                })?)
            }
            Transport::Tcp(addr) => {
                let stream = match source {
                    None => TcpStream::connect(addr)
                        .with_context(|| format!("cannot connect to {addr} (connection {i})"))?,
                    Some(ip) => connect_tcp_from(ip, *addr).with_context(|| {
                        format!("cannot connect to {addr} from {ip} (connection {i})")
                    })?,
                };
                stream.set_nodelay(true)?;
                stream.set_nonblocking(true)?;
                Conn::Stream(File::from(std::os::fd::OwnedFd::from(stream)))
            }
            Transport::Unix(path) => {
                let stream = UnixStream::connect(path)
                    .with_context(|| format!("cannot connect to {}", path.display()))?;
                stream.set_nonblocking(true)?;
                Conn::Stream(File::from(std::os::fd::OwnedFd::from(stream)))
            }
        };
        conns.push(conn);
    }
    Ok(conns)
}

/// A non-blocking UDP socket bound to `local` and connected to `target`.
fn udp_connect(local: SocketAddr, target: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(local)?;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A socket like `old`, from the same address and to the same peer, with a new source port.
pub(super) fn fresh_udp_socket(old: &UdpSocket) -> io::Result<UdpSocket> {
    udp_connect(SocketAddr::new(old.local_addr()?.ip(), 0), old.peer_addr()?)
}

/// A TCP connection to `target` from the address `source`.
fn connect_tcp_from(source: IpAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    // Let connect() pick the source port, so ports are unique per 4-tuple rather than per address.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&target.into())?;
    Ok(socket.into())
}

/// `--hold`: says how many connections are held, holds them idle for `hold`, then closes them.
pub(super) fn hold_idle(conns: Vec<Conn>, hold: Duration, json: bool) -> Result<()> {
    let n = conns.len();
    if json {
        println!(
            "{{\"held_connections\": {n}, \"hold_s\": {}}}",
            hold.as_secs_f64()
        );
    } else {
        println!(
            "holding {n} idle connections for {:.1} s",
            hold.as_secs_f64()
        );
    }
    io::stdout().flush()?;
    std::thread::sleep(hold);
    drop(conns);
    Ok(())
}
