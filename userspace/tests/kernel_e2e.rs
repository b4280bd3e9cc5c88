//! End-to-end tests of the kernel datapath on loopback ephemeral ports: exactness across many UDP, TCP
//! and Unix clients, invalid input, stream framing, shutdown, start-up errors, sockperf and the bench.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn stream_client<S: Read + Write>(
    mut stream: S,
    seed: u64,
    n: usize,
    pipeline: usize,
    seen: Observations,
) {
    let mut rng = Rng::new(seed);
    let mut local = Vec::with_capacity(n);
    let mut sent = 0;
    while sent < n {
        let k = pipeline.min(n - sent);
        let increments: Vec<u64> = (0..k).map(|_| 1 + rng.below(1000)).collect();
        let bytes: Vec<u8> = increments.iter().flat_map(|&v| frame(v)).collect();
        stream.write_all(&bytes).unwrap();
        let mut replies = vec![0u8; 16 * k];
        stream.read_exact(&mut replies).unwrap();
        let mut previous = None;
        for (increment, reply) in increments.iter().zip(replies.chunks(16)) {
            let value = parse_reply(reply);
            // Pipelined frames are answered in order.
            if let Some(p) = previous {
                assert!(value > p, "replies out of order: {value} after {p}");
            }
            previous = Some(value);
            local.push((*increment, value));
        }
        sent += k;
    }
    seen.lock().unwrap().extend(local);
}

fn exactness_run(poll: &str) {
    let sock = temp_path(&format!("exact-{poll}.sock"));
    let unix_spec = format!("unix://{}", sock.display());
    let server = Server::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        &unix_spec,
        "--poll",
        poll,
    ]);
    let udp = server.addr("counter+udp");
    let tcp = server.addr("counter+tcp");
    let seen: Observations = Arc::default();
    let mut threads = Vec::new();
    for c in 0..4u64 {
        let seen = seen.clone();
        threads.push(std::thread::spawn(move || {
            udp_client(udp, 100 + c, 1500, seen)
        }));
    }
    for c in 0..4u64 {
        let seen = seen.clone();
        threads.push(std::thread::spawn(move || {
            let s = TcpStream::connect(tcp).unwrap();
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            stream_client(s, 200 + c, 1500, 1 + c as usize * 7, seen)
        }));
    }
    for c in 0..4u64 {
        let seen = seen.clone();
        let sock = sock.clone();
        threads.push(std::thread::spawn(move || {
            let s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            stream_client(s, 300 + c, 1500, 1 + c as usize * 5, seen)
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 12 * 1500);
    let sum = check_exact(&seen);
    let (ok, output) = server.terminate();
    assert!(ok, "serve must exit 0 on SIGTERM:\n{output}");
    assert_eq!(
        final_counter(&output),
        sum,
        "final counter = sum of all increments"
    );
    assert_eq!(total_field(&output, "requests"), 18000);
    assert_eq!(total_field(&output, "replies"), 18000);
    assert!(!sock.exists(), "the Unix socket file is removed on exit");
}

#[test]
fn exact_counter_across_udp_tcp_and_unix_clients_block() {
    exactness_run("block");
}

#[test]
fn exact_counter_across_udp_tcp_and_unix_clients_spin() {
    exactness_run("spin");
}

#[test]
fn invalid_datagrams_are_never_answered_and_change_nothing() {
    let server = Server::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "sockperf+udp://127.0.0.1:0",
        "--cpus",
        "0",
    ]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(server.addr("counter+udp")).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let invalid: Vec<Vec<u8>> = vec![
        b"aaaaaaaaaaaaaaaa".to_vec(),
        vec![],
        vec![1],
        frame(1)[..15].to_vec(),
        [&frame(1)[..], &[0u8]].concat(),
        [frame(1), frame(1)].concat(),
        vec![0u8; 16],
        vec![0xff; 16],
        vec![0u8; 4000],
    ];
    for bytes in &invalid {
        socket.send(bytes).unwrap();
    }
    // A read after them: the first datagram back must be its reply, with the counter untouched.
    socket.send(&frame(0)).unwrap();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(parse_reply(&buf[..n]), 0);
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        socket.recv(&mut buf).is_err(),
        "nothing else may be answered"
    );

    let sockperf = UdpSocket::bind("127.0.0.1:0").unwrap();
    sockperf.connect(server.addr("sockperf+udp")).unwrap();
    sockperf
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    sockperf.send(&[0u8; 13]).unwrap();
    assert!(
        sockperf.recv(&mut buf).is_err(),
        "short sockperf datagrams are dropped"
    );

    let (ok, output) = server.terminate();
    assert!(ok);
    assert_eq!(final_counter(&output), 0);
    assert_eq!(total_field(&output, "drop_bad_hash"), 3);
    assert_eq!(total_field(&output, "drop_wrong_length"), 5);
    assert_eq!(total_field(&output, "drop_oversize"), 1);
    assert_eq!(total_field(&output, "drop_too_short"), 1);
    assert_eq!(total_field(&output, "replies"), 1);
}

#[test]
fn stream_invalid_frame_closes_after_answering_earlier_frames() {
    let server = Server::start(&["--listen", "tcp://127.0.0.1:0"]);
    let mut s = TcpStream::connect(server.addr("counter+tcp")).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(&[&frame(5)[..], b"aaaaaaaaaaaaaaaa", &frame(7)[..]].concat())
        .unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(parse_reply(&reply), 5);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the server closes the connection");
    assert!(
        rest.is_empty(),
        "nothing after the invalid frame is answered"
    );
    let (ok, output) = server.terminate();
    assert!(ok);
    assert_eq!(final_counter(&output), 5);
    assert_eq!(total_field(&output, "drop_bad_hash"), 1);
    assert_eq!(total_field(&output, "conns_rejected"), 1);
}

#[test]
fn byte_by_byte_writes_and_mid_frame_disconnects() {
    let server = Server::start(&["--listen", "tcp://127.0.0.1:0"]);
    let addr = server.addr("counter+tcp");

    // A client that disconnects mid-frame harms nobody.
    let mut quitter = TcpStream::connect(addr).unwrap();
    quitter.write_all(&frame(1000)[..7]).unwrap();
    drop(quitter);

    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let bytes: Vec<u8> = [frame(3), frame(4), frame(5)].concat();
    for b in &bytes {
        s.write_all(std::slice::from_ref(b)).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    let mut replies = [0u8; 48];
    s.read_exact(&mut replies).unwrap();
    let values: Vec<u64> = replies.chunks(16).map(parse_reply).collect();
    assert_eq!(values, vec![3, 7, 12]);
    drop(s);
    let (ok, output) = server.terminate();
    assert!(ok);
    assert_eq!(final_counter(&output), 12);
    assert_eq!(total_field(&output, "drop_wrong_length"), 1);
}

#[test]
fn echo_and_sockperf_reflect() {
    let server = Server::start(&[
        "--listen",
        "echo+udp://127.0.0.1:0",
        "--listen",
        "echo+tcp://127.0.0.1:0",
        "--listen",
        "sockperf+tcp://127.0.0.1:0",
    ]);
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.connect(server.addr("echo+udp")).unwrap();
    u.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 2048];
    for payload in [&b"x"[..], &b"hello ricochet"[..], &[0xa5u8; 1400][..]] {
        u.send(payload).unwrap();
        let n = u.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], payload);
    }
    let mut t = TcpStream::connect(server.addr("echo+tcp")).unwrap();
    t.set_read_timeout(Some(TIMEOUT)).unwrap();
    t.write_all(b"any stimulus").unwrap();
    let mut back = [0u8; 12];
    t.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"any stimulus");

    let mut sp = TcpStream::connect(server.addr("sockperf+tcp")).unwrap();
    sp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let ping = b"\0\0\0\0\0\0\0\x01\x00\x03\x00\x00\x00\x14padpad";
    sp.write_all(ping).unwrap();
    let mut pong = [0u8; 20];
    sp.read_exact(&mut pong).unwrap();
    let mut expected = *ping;
    expected[9] = 0x02;
    assert_eq!(pong, expected);
}

fn serve_fails(args: &[&str]) -> String {
    let out = Command::new(BIN).arg("serve").args(args).output().unwrap();
    assert!(!out.status.success(), "serve {args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn start_up_errors_are_clear() {
    let held = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let err = serve_fails(&["--listen", &format!("udp://127.0.0.1:{port}")]);
    assert!(err.contains("address already in use"), "{err}");

    let err = serve_fails(&["--listen", "udp:/127.0.0.1:1"]);
    assert!(err.contains("expected [PROTO+]TRANSPORT://ADDR"), "{err}");

    let err = serve_fails(&["--listen", "udp://127.0.0.1:0", "--cpus", "4000"]);
    assert!(err.contains("CPU 4000 is not allowed"), "{err}");

    let file = temp_path("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = serve_fails(&["--listen", &format!("unix://{}", file.display())]);
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let err = serve_fails(&[]);
    assert!(err.contains("--listen"), "{err}");
}

#[test]
fn a_stale_unix_socket_is_replaced_and_a_live_one_is_not() {
    let path = temp_path("stale.sock");
    let _ = std::fs::remove_file(&path);
    // A dead instance: the listener is gone but its file remains.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let spec = format!("unix://{}", path.display());
    let server = Server::start(&["--listen", &spec]);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(&frame(9)).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(parse_reply(&reply), 9);

    let err = serve_fails(&["--listen", &spec]);
    assert!(err.contains("another process is listening"), "{err}");
    drop(server);
}

#[test]
fn sockperf_client_reports_no_drops() {
    if !require_tool("sockperf", "sockperf") {
        return;
    }
    for poll in ["block", "spin"] {
        let server = Server::start(&["--listen", "sockperf+udp://127.0.0.1:0", "--poll", poll]);
        let port = server.addr("sockperf+udp").port().to_string();
        let out = Command::new("sockperf")
            .args(["ping-pong", "-i", "127.0.0.1", "-p", &port, "-t", "2"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("# dropped messages = 0;"), "{poll}: {text}");
        assert!(
            text.contains("# out-of-order messages = 0"),
            "{poll}: {text}"
        );
        let received: u64 = text
            .lines()
            .find(|l| l.contains("[Valid Duration]"))
            .and_then(|l| l.split("ReceivedMessages=").nth(1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            received > 100,
            "{poll}: sockperf measured too little: {text}"
        );
        // A lone UDP listener in block mode sleeps in recvmmsg: SIGTERM must still stop it promptly.
        let (ok, output) = server.terminate();
        assert!(ok, "{output}");
        assert_eq!(
            total_field(&output, "requests"),
            total_field(&output, "replies")
        );
        assert!(total_field(&output, "replies") >= received);
    }
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_client_verifies_and_reports() {
    let sock = temp_path("bench.sock");
    let server = Server::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        &format!("unix://{}", sock.display()),
    ]);
    let hgrm = temp_path("bench.hgrm");
    let udp = server.spec("counter+udp");
    let r = bench_json(&[
        &udp,
        "--requests",
        "4000",
        "-c",
        "4",
        "-d",
        "4",
        "--increment",
        "3",
        "--hgrm",
        hgrm.to_str().unwrap(),
    ]);
    assert_eq!(r["sent"], 4000);
    assert_eq!(r["received"], 4000);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["late"], 0);
    assert_eq!(r["unanswered"], 0);
    assert_eq!(r["invalid_replies"], 0);
    assert_eq!(r["duplicate_values"], 0);
    assert_eq!(r["last_counter_value"], 12000);
    assert!(r["latency_ns"]["p50"].as_u64().unwrap() > 0);
    assert!(r["latency_ns"]["p99"].as_u64() >= r["latency_ns"]["p50"].as_u64());
    let text = std::fs::read_to_string(&hgrm).unwrap();
    assert!(text.contains("Percentile") && text.contains("#[Max"));

    let tcp = server.spec("counter+tcp");
    let r = bench_json(&[&tcp, "--duration", "1s", "-c", "3", "-d", "8"]);
    assert!(r["received"].as_u64().unwrap() > 100);
    assert_eq!(r["received"], r["sent"]);
    assert_eq!(r["non_increasing"], 0);
    // Streams never count requests as lost: a timeout there is "unanswered".
    assert_eq!(r["lost"], 0);
    assert_eq!(r["unanswered"], 0);

    // Open loop: the request count follows the rate, not the server's speed.
    let unix = server.spec("counter+unix");
    let r = bench_json(&[
        &unix,
        "--duration",
        "1s",
        "--rate",
        "2000",
        "-c",
        "2",
        "--warmup",
        "200ms",
    ]);
    let sent = r["sent"].as_u64().unwrap();
    assert!(
        (1800..=2200).contains(&sent),
        "open loop at 2000/s for 1 s sent {sent}"
    );

    let (ok, output) = server.terminate();
    assert!(ok);
    assert!(final_counter(&output) >= 12000);
}

#[test]
fn bench_reports_lost_requests_against_a_silent_port() {
    // Nobody answers on this port: every request is lost after the timeout, none is invalid, the
    // report says there is no latency, and bench fails after printing it.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let spec = format!("udp://{}", silent.local_addr().unwrap());
    let out = Command::new(BIN)
        .args([
            "bench",
            &spec,
            "--requests",
            "5",
            "--timeout",
            "100ms",
            "--json",
        ])
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["sent"], 5);
    assert_eq!(r["received"], 0);
    assert_eq!(r["lost"], 5);
    assert_eq!(r["late"], 0);
    assert_eq!(r["invalid_replies"], 0);
    assert!(r["latency_ns"].is_null(), "no fake percentiles: {r}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("none of the 5 requests was answered")
            && stderr.contains("no latency to report"),
        "{stderr}"
    );

    // The text report says so too instead of printing zero percentiles.
    let out = Command::new(BIN)
        .args(["bench", &spec, "--requests", "2", "--timeout", "50ms"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("latency       none: no request was answered") && !stdout.contains("p50"),
        "{stdout}"
    );
}
