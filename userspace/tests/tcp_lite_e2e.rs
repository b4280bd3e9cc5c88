//! End-to-end tests of TCP-lite on both bypass datapaths (the AF_XDP workers and the XDP program),
//! in a fresh pair of network namespaces joined by a veth pair, with real Linux TCP clients: Rust
//! std sockets, Python, sockperf, ricochet's own bench client, and raw segments for what no
//! well-behaved client sends. Every case runs in both modes, with the same expectations.
//!
//! The lab's client namespace sets `net.core.txrehash=0`: on veth a flow's RX queue is its sender's
//! TX queue, which the sender re-picks after a retransmission timeout, and each AF_XDP worker keeps
//! its own connections (a NIC's RSS keeps a flow on one queue).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;

const ECHO_PORT: u16 = 7778;
const SOCKPERF_PORT: u16 = 11111;

fn start(lab: &LabNet, mode: &str, extra: &[&str]) -> Server {
    let listen = [
        format!("tcp://{LAB_SERVER}:{COUNTER_PORT}"),
        format!("udp://{LAB_SERVER}:{COUNTER_PORT}"),
        format!("echo+tcp://{LAB_SERVER}:{ECHO_PORT}"),
        format!("sockperf+tcp://{LAB_SERVER}:{SOCKPERF_PORT}"),
    ];
    let mut args = vec!["--mode", mode, "--iface", &lab.server_if];
    for spec in &listen {
        args.extend_from_slice(&["--listen", spec]);
    }
    args.extend_from_slice(extra);
    let (ok, out) = lab.client_cmd("sysctl", &["-qw", "net.core.txrehash=0"]);
    assert!(
        ok,
        "sysctl net.core.txrehash=0 in the client namespace: {out}"
    );
    Server::start_in(Some(&lab.server_ns), &args)
}

/// `Tcp: ... InSegs ...` of a namespace's /proc/net/snmp: the segments its TCP stack received.
fn tcp_in_segs(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "InSegs")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

fn connect(to: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&to, TIMEOUT).expect("TCP connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// One request on `stream`, its frame written in two parts; returns (increment, reply value).
fn split_request(stream: &mut TcpStream, increment: u64, cut: usize) -> (u64, u64) {
    let f = frame(increment);
    stream.write_all(&f[..cut]).unwrap();
    stream.write_all(&f[cut..]).unwrap();
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).unwrap();
    (increment, parse_reply(&reply))
}

/// `frames` requests written at once (pipelined); returns what each reply said.
fn pipelined(stream: &mut TcpStream, increments: &[u64]) -> Vec<(u64, u64)> {
    let bytes: Vec<u8> = increments.iter().flat_map(|&i| frame(i)).collect();
    stream.write_all(&bytes).unwrap();
    let mut replies = vec![0u8; bytes.len()];
    stream.read_exact(&mut replies).unwrap();
    let values = replies.chunks(16).map(parse_reply);
    increments.iter().copied().zip(values).collect()
}

/// `threads` × `per_thread` connections, all open at once, each answering split and pipelined
/// requests; half the connections set TCP_NODELAY.
fn many_connections(lab: &LabNet, threads: usize, per_thread: usize, seen: &Observations) {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (seen, barrier) = (seen.clone(), barrier.clone());
            in_netns(&lab.client_ns, move || {
                let mut rng = Rng::new(77 + t as u64);
                let mut conns: Vec<TcpStream> = (0..per_thread)
                    .map(|_| connect(addr(COUNTER_PORT)))
                    .collect();
                // Every connection of every thread is open here.
                barrier.wait();
                let mut local = Vec::new();
                for (i, stream) in conns.iter_mut().enumerate() {
                    stream.set_nodelay(i % 2 == 0).unwrap();
                    let cut = 1 + rng.below(15) as usize;
                    local.push(split_request(stream, 1 + rng.below(100), cut));
                    if i % 25 == 0 {
                        let incs: Vec<u64> = (0..40).map(|_| rng.below(10)).collect();
                        local.extend(pipelined(stream, &incs));
                    }
                }
                seen.lock().unwrap().extend(local);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// A Python client on the echo listener: bytes sent in odd-sized writes come back unchanged.
fn python_echo(lab: &LabNet) {
    let script = format!(
        "import os, socket\n\
         s = socket.create_connection(('{LAB_SERVER}', {ECHO_PORT}), timeout=20)\n\
         data = os.urandom(20000)\n\
         got = b''\n\
         for i in range(0, len(data), 777):\n    \
             s.sendall(data[i:i + 777])\n    \
             while len(got) < min(i + 777, len(data)):\n        \
                 got += s.recv(65536)\n\
         assert got == data, 'echo differs'\n\
         s.shutdown(socket.SHUT_WR)\n\
         assert s.recv(10) == b'', 'no FIN after ours'\n\
         print('python echo ok')\n"
    );
    let (ok, out) = lab.client_cmd("python3", &["-c", &script]);
    assert!(ok && out.contains("python echo ok"), "python echo: {out}");
}

#[test]
fn afxdp_answers_real_tcp_clients_without_the_kernel_stack() {
    answers_real_tcp_clients_without_the_kernel_stack("afxdp", "tl");
}

#[test]
fn xdp_answers_real_tcp_clients_without_the_kernel_stack() {
    answers_real_tcp_clients_without_the_kernel_stack("xdp", "tlx");
}

fn answers_real_tcp_clients_without_the_kernel_stack(mode: &str, tag: &str) {
    let Some(lab) = LabNet::create(tag, 2) else {
        return;
    };
    let server = start(&lab, mode, &[]);
    let segs_before = tcp_in_segs(&lab.server_ns);
    let seen: Observations = Arc::default();
    many_connections(&lab, 4, 500, &seen);
    python_echo(&lab);
    let sum = check_exact(&seen.lock().unwrap());
    let spec = format!("tcp://{LAB_SERVER}:{COUNTER_PORT}");
    let r = bench_json_in(
        &lab,
        &[&spec, "-c", "8", "--requests", "4000", "--increment", "2"],
    );
    assert_eq!(
        (r["received"].as_u64(), r["lost"].as_u64()),
        (Some(4000), Some(0))
    );
    if require_tool("sockperf", "sockperf") {
        let port = SOCKPERF_PORT.to_string();
        let (ok, out) = lab.client_cmd(
            "sockperf",
            &[
                "ping-pong",
                "--tcp",
                "-i",
                LAB_SERVER,
                "-p",
                &port,
                "-t",
                "2",
            ],
        );
        assert!(
            ok && out.contains("Summary: Latency"),
            "sockperf --tcp: {out}"
        );
    }
    let segs_after = tcp_in_segs(&lab.server_ns);
    assert_eq!(
        segs_after, segs_before,
        "the server's kernel TCP stack saw the lab's segments"
    );
    // Loopback in the server's namespace: the kernel path, on the same counter.
    let replies = in_netns(&lab.server_ns, move || {
        let mut stream = connect(addr(COUNTER_PORT));
        pipelined(&mut stream, &[5, 6, 7])
    })
    .join()
    .unwrap();
    let base = sum + 2 * 4000;
    assert_eq!(replies, vec![(5, base + 5), (6, base + 11), (7, base + 18)]);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(final_counter(&output), base + 18);
    // 2,000 Rust clients, 8 bench connections, Python and sockperf (the loopback one is the kernel's).
    assert!(total_field(&output, "tcp_handshakes") >= 2010, "{output}");
    assert_eq!(total_field(&output, "tcp_cookie_failures"), 0);
}

/// nftables rules in the client namespace that drop `percent`% of the lab's TCP segments to and
/// from `port`, both directions (the kernel here has no netem).
fn lose(lab: &LabNet, port: u16, percent: u32) {
    let rules = format!(
        "table inet ricochet_loss {{\n\
           chain out {{ type filter hook output priority 0; tcp dport {port} numgen random mod 100 < {percent} drop; }}\n\
           chain in {{ type filter hook input priority 0; tcp sport {port} numgen random mod 100 < {percent} drop; }}\n\
         }}\n"
    );
    let path = temp_path("loss.nft");
    std::fs::write(&path, rules).unwrap();
    let (ok, out) = lab.client_cmd("nft", &["-f", path.to_str().unwrap()]);
    assert!(ok, "nft: {out}");
}

#[test]
fn afxdp_tcp_is_exact_under_two_percent_loss() {
    tcp_is_exact_under_two_percent_loss("afxdp", "tx");
}

#[test]
fn xdp_tcp_is_exact_under_two_percent_loss() {
    tcp_is_exact_under_two_percent_loss("xdp", "txx");
}

fn tcp_is_exact_under_two_percent_loss(mode: &str, tag: &str) {
    if !require_tool("nft", "nftables") {
        return;
    }
    let Some(lab) = LabNet::create(tag, 2) else {
        return;
    };
    let server = start(&lab, mode, &[]);
    // The rules live in the client namespace and go with it.
    lose(&lab, COUNTER_PORT, 2);
    let seen: Observations = Arc::default();
    let handles: Vec<_> = (0..8u64)
        .map(|c| {
            let seen = seen.clone();
            in_netns(&lab.client_ns, move || {
                let mut rng = Rng::new(500 + c);
                let mut stream = connect(addr(COUNTER_PORT));
                let mut local = Vec::new();
                for i in 0..150 {
                    let cut = 1 + rng.below(15) as usize;
                    local.push(split_request(&mut stream, 1 + rng.below(50), cut));
                    if i % 30 == 0 {
                        let incs: Vec<u64> = (0..60).map(|_| rng.below(5)).collect();
                        local.extend(pipelined(&mut stream, &incs));
                    }
                }
                seen.lock().unwrap().extend(local);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let sum = check_exact(&seen.lock().unwrap());
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(final_counter(&output), sum, "exact under loss");
    let recovered =
        total_field(&output, "tcp_retransmitted") + total_field(&output, "tcp_out_of_order");
    assert!(
        recovered > 0,
        "2% loss and no retransmission seen: {output}"
    );
}

/// A TCP segment from the client namespace through a raw socket (the kernel adds the IP header).
fn raw_segment(
    socket: &socket2::Socket,
    source_port: u16,
    seq: u32,
    ack: Option<u32>,
    payload: &[u8],
) {
    let mut header = etherparse::TcpHeader::new(source_port, COUNTER_PORT, seq, 64240);
    match ack {
        Some(ack) => {
            header.ack = true;
            header.psh = true;
            header.acknowledgment_number = ack;
        }
        None => header.syn = true,
    }
    header.checksum = header
        .calc_checksum_ipv4_raw([198, 18, 0, 2], [198, 18, 0, 1], payload)
        .unwrap();
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(payload);
    let to: SocketAddr = format!("{LAB_SERVER}:0").parse().unwrap();
    socket.send_to(&bytes, &to.into()).unwrap();
}

#[test]
fn afxdp_tcp_syn_floods_strays_and_limits() {
    tcp_syn_floods_strays_and_limits("afxdp", "tf");
}

#[test]
fn xdp_tcp_syn_floods_strays_and_limits() {
    tcp_syn_floods_strays_and_limits("xdp", "tfx");
}

fn tcp_syn_floods_strays_and_limits(mode: &str, tag: &str) {
    if !require_tool("nft", "nftables") {
        return;
    }
    let Some(lab) = LabNet::create(tag, 1) else {
        return;
    };
    let server = start(
        &lab,
        mode,
        &["--tcp-max-conns", "4", "--tcp-idle-timeout", "2s"],
    );
    // The client kernel would answer the flood's SYN-ACKs with RST: drop those.
    let rules = format!(
        "table inet ricochet_rst {{\n\
           chain out {{ type filter hook output priority 0; tcp dport {COUNTER_PORT} tcp flags & rst == rst drop; }}\n\
         }}\n"
    );
    let path = temp_path("rst.nft");
    std::fs::write(&path, rules).unwrap();
    let (ok, out) = lab.client_cmd("nft", &["-f", path.to_str().unwrap()]);
    assert!(ok, "nft: {out}");
    in_netns(&lab.client_ns, || {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::TCP),
        )
        .expect("a raw socket (needs root)");
        let mut rng = Rng::new(9);
        for i in 0..5000u32 {
            raw_segment(
                &socket,
                20000 + (i % 20000) as u16,
                rng.next() as u32,
                None,
                &[],
            );
        }
        // Data with no handshake behind it: never answered, never counted. Paced, after the
        // flood has drained, so that no stray is lost to a full RX ring and each is counted.
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..200u32 {
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            let (seq, ack) = (rng.next() as u32, rng.next() as u32);
            raw_segment(&socket, 45000 + i as u16, seq, Some(ack), &frame(1000));
        }
    })
    .join()
    .unwrap();
    let (increment, value) = in_netns(&lab.client_ns, || {
        // Four connections fill the table; a fifth is refused with RST; the four keep working.
        let mut kept: Vec<TcpStream> = (0..4).map(|_| connect(addr(COUNTER_PORT))).collect();
        // The refusal may reach the client during connect, its write or its read.
        let mut buf = [0u8; 16];
        let refused = TcpStream::connect_timeout(&addr(COUNTER_PORT), TIMEOUT).and_then(|mut s| {
            s.set_read_timeout(Some(TIMEOUT))?;
            s.write_all(&frame(1))?;
            s.read(&mut buf)
        });
        assert!(
            matches!(refused, Err(_) | Ok(0)),
            "a fifth connection was served: {refused:?}"
        );
        let mut last = (0, 0);
        for stream in &mut kept {
            last = split_request(stream, 3, 8);
        }
        // Idle past --tcp-idle-timeout: forgotten, so a request on it is never answered.
        std::thread::sleep(Duration::from_millis(3500));
        let stream = &mut kept[0];
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream.write_all(&frame(50)).unwrap();
        assert!(
            stream.read_exact(&mut buf).is_err(),
            "a forgotten connection was answered"
        );
        last
    })
    .join()
    .unwrap();
    assert_eq!(
        (increment, value),
        (3, 12),
        "nothing the flood or the strays sent was counted"
    );
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(final_counter(&output), 12);
    assert_eq!(total_field(&output, "tcp_handshakes"), 4);
    assert!(total_field(&output, "tcp_table_full") >= 1);
    assert!(
        total_field(&output, "tcp_cookie_failures") >= 200,
        "{output}"
    );
    assert!(total_field(&output, "tcp_idle_closed") >= 4);
    assert_eq!(total_field(&output, "requests"), 4);
}

/// A TCP client scripted segment by segment through a raw socket in the client namespace, for
/// what no well-behaved client sends on cue. Its ports are above the ephemeral range, and an
/// nftables rule drops the client kernel's RSTs for them.
struct Scripted {
    socket: socket2::Socket,
    port: u16,
    /// The next byte this client sends, and the next it expects from the server.
    seq: u32,
    ack: u32,
}

/// A segment from the server, as the raw socket saw it.
#[derive(Debug)]
struct Seen {
    seq: u32,
    ack: u32,
    fin: bool,
    rst: bool,
    window: u16,
    payload: Vec<u8>,
}

impl Scripted {
    const SYN: u8 = 0x02;
    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;

    fn connect(port: u16) -> Scripted {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::TCP),
        )
        .expect("a raw socket (needs root)");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut c = Scripted {
            socket,
            port,
            seq: 1_000_000 + u32::from(port),
            ack: 0,
        };
        c.send(c.seq, Self::SYN, 64240, &[]);
        let syn_ack = c.recv().expect("SYN-ACK");
        assert_eq!(syn_ack.ack, c.seq.wrapping_add(1));
        c.seq = c.seq.wrapping_add(1);
        c.ack = syn_ack.seq.wrapping_add(1);
        c.send(c.seq, Self::ACK, 64240, &[]);
        c
    }

    fn send(&self, seq: u32, flags: u8, window: u16, payload: &[u8]) {
        let mut h = etherparse::TcpHeader::new(self.port, COUNTER_PORT, seq, window);
        h.syn = flags & Self::SYN != 0;
        h.fin = flags & Self::FIN != 0;
        h.rst = flags & Self::RST != 0;
        h.ack = flags & Self::ACK != 0;
        h.psh = !payload.is_empty();
        h.acknowledgment_number = if h.ack { self.ack } else { 0 };
        if h.syn {
            h.set_options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
                .unwrap();
        }
        h.checksum = h
            .calc_checksum_ipv4_raw([198, 18, 0, 2], [198, 18, 0, 1], payload)
            .unwrap();
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        let to: SocketAddr = format!("{LAB_SERVER}:0").parse().unwrap();
        self.socket.send_to(&bytes, &to.into()).unwrap();
    }

    /// Data (with ACK) at the next sequence number.
    fn data(&mut self, payload: &[u8], window: u16) -> Option<Seen> {
        self.send(self.seq, Self::ACK, window, payload);
        self.seq = self.seq.wrapping_add(payload.len() as u32);
        self.recv()
    }

    /// The next segment from the server to this client within 1 s, if any.
    fn recv(&self) -> Option<Seen> {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        while std::time::Instant::now() < deadline {
            let Ok(n) = self.socket.recv(&mut buf) else {
                continue;
            };
            // SAFETY: recv initialised the first n bytes.
            let bytes: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let ip = etherparse::Ipv4HeaderSlice::from_slice(&bytes).unwrap();
            let tcp = etherparse::TcpHeaderSlice::from_slice(&bytes[ip.slice().len()..]).unwrap();
            if tcp.source_port() != COUNTER_PORT || tcp.destination_port() != self.port {
                continue;
            }
            let start = ip.slice().len() + tcp.slice().len();
            let end = usize::from(ip.total_len()).min(bytes.len());
            return Some(Seen {
                seq: tcp.sequence_number(),
                ack: tcp.acknowledgment_number(),
                fin: tcp.fin(),
                rst: tcp.rst(),
                window: tcp.window_size(),
                payload: bytes[start..end].to_vec(),
            });
        }
        None
    }
}

/// The window a scripted client's own RSTs carry, so the rule below lets them through.
const SCRIPTED_RST_WINDOW: u16 = 4242;

/// Drops the client kernel's RSTs to the lab's counter port: the scripted clients have no socket.
fn drop_client_rsts(lab: &LabNet) {
    let rules = format!(
        "table inet ricochet_rst {{\n\
           chain out {{ type filter hook output priority 0; tcp dport {COUNTER_PORT} tcp flags & rst == rst tcp window != {SCRIPTED_RST_WINDOW} drop; }}\n\
         }}\n"
    );
    let path = temp_path("rst-scripted.nft");
    std::fs::write(&path, rules).unwrap();
    let (ok, out) = lab.client_cmd("nft", &["-f", path.to_str().unwrap()]);
    assert!(ok, "nft: {out}");
}

#[test]
fn afxdp_tcp_edge_cases_from_scripted_segments() {
    tcp_edge_cases_from_scripted_segments("afxdp", "ts");
}

#[test]
fn xdp_tcp_edge_cases_from_scripted_segments() {
    tcp_edge_cases_from_scripted_segments("xdp", "tsx");
}

/// Retransmission, out of order, zero window, keepalive, FIN, an invalid frame and RST, each on
/// its own scripted connection; the counter afterwards holds each accepted increment once.
fn tcp_edge_cases_from_scripted_segments(mode: &str, tag: &str) {
    if !require_tool("nft", "nftables") {
        return;
    }
    let Some(lab) = LabNet::create(tag, 1) else {
        return;
    };
    let server = start(&lab, mode, &[]);
    drop_client_rsts(&lab);
    let total = in_netns(&lab.client_ns, scripted_cases).join().unwrap();
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(final_counter(&output), total, "each increment counted once");
    assert!(total_field(&output, "tcp_retransmitted") >= 1, "{output}");
    assert!(total_field(&output, "tcp_out_of_order") >= 1, "{output}");
}

/// The scripted cases; returns the increments the server must have applied.
fn scripted_cases() -> u64 {
    // A retransmitted request gets the same reply bytes and is counted once.
    let mut c = Scripted::connect(61001);
    let first = c.data(&frame(5), 64240).expect("a reply");
    c.seq = c.seq.wrapping_sub(16);
    let again = c.data(&frame(5), 64240).expect("the reply again");
    assert_eq!((first.payload.len(), &first.payload), (16, &again.payload));
    assert_eq!(parse_reply(&first.payload), 5);
    // Out of order: a segment beyond a gap gets a duplicate ACK and is not taken; the gap's
    // segment then gets its own reply.
    let mut o = Scripted::connect(61002);
    o.send(o.seq.wrapping_add(16), Scripted::ACK, 64240, &frame(1));
    let dup = o.recv().expect("a duplicate ACK");
    assert_eq!((dup.ack, dup.payload.len()), (o.seq, 0));
    let filled = o.data(&frame(2), 64240).expect("a reply");
    assert_eq!((filled.ack, parse_reply(&filled.payload)), (o.seq, 7));
    // Zero window: the reply waits, and its request is not acknowledged; a window update
    // releases it.
    let mut z = Scripted::connect(61003);
    let held = z.data(&frame(3), 0).expect("an ACK");
    assert!(
        held.payload.is_empty(),
        "a reply into a zero window: {held:?}"
    );
    z.send(z.seq, Scripted::ACK, 64240, &[]);
    let released = z.recv().expect("the held reply");
    assert_eq!((released.ack, parse_reply(&released.payload)), (z.seq, 10));
    z.ack = released.seq.wrapping_add(16);
    // A keepalive probe (one byte before the next) is answered with an ACK.
    z.send(z.seq.wrapping_sub(1), Scripted::ACK, 64240, &[]);
    let alive = z.recv().expect("a keepalive answer");
    assert_eq!((alive.ack, alive.window > 0), (z.seq, true));
    // FIN is acknowledged and answered with FIN.
    z.send(z.seq, Scripted::FIN | Scripted::ACK, 64240, &[]);
    let fin = z.recv().expect("FIN");
    assert!(fin.fin && fin.ack == z.seq.wrapping_add(1), "{fin:?}");
    // An invalid frame: the frame before it is answered, then FIN; more data gets RST.
    let mut b = Scripted::connect(61004);
    let mut bytes = frame(4).to_vec();
    bytes.extend([0u8; 16]);
    let closing = b.data(&bytes, 64240).expect("the first reply and FIN");
    assert_eq!((parse_reply(&closing.payload), closing.fin), (14, true));
    assert!(b.data(&frame(1), 64240).expect("RST").rst);
    // RST at the next byte forgets the connection: its later data is refused with RST.
    let mut r = Scripted::connect(61005);
    assert_eq!(parse_reply(&r.data(&frame(6), 64240).unwrap().payload), 20);
    r.send(r.seq, Scripted::RST, SCRIPTED_RST_WINDOW, &[]);
    assert!(r.data(&frame(100), 64240).expect("RST").rst);
    20
}
