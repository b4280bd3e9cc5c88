//! End-to-end tests of `ricochet bench` against fake servers written here, on loopback: flag ranges,
//! the exit rule when (almost) nothing answers, and how late, lost and unanswered requests count.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::BIN;
use ricochet::wire::CounterRepr;

/// No fake server outlives this, whatever happens to the test.
const SERVER_LIFETIME: Duration = Duration::from_secs(20);

/// A fake server thread, stopped when dropped.
struct FakeServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    fn spawn<F>(addr: SocketAddr, serve: F) -> FakeServer
    where
        F: FnOnce(Arc<AtomicBool>) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || serve(flag));
        FakeServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn spec(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn running(stop: &AtomicBool, started: Instant) -> bool {
    !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME
}

/// A UDP server that answers each request with `answer` (None: no reply), and sends the reply to
/// the `delayed`-th request (1-based) `delay` late while it keeps answering the others at once.
fn udp_server<A>(delayed: u64, delay: Duration, mut answer: A) -> FakeServer
where
    A: FnMut(u64, &[u8]) -> Option<Vec<u8>> + Send + 'static,
{
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    FakeServer::spawn(socket.local_addr().unwrap(), move |stop| {
        let started = Instant::now();
        let mut held: VecDeque<(Instant, Vec<u8>, SocketAddr)> = VecDeque::new();
        let mut buf = [0u8; 2048];
        let mut n_requests = 0;
        while running(&stop, started) {
            while held
                .front()
                .is_some_and(|(due, _, _)| *due <= Instant::now())
            {
                let (_, reply, to) = held.pop_front().unwrap();
                socket.send_to(&reply, to).unwrap();
            }
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            n_requests += 1;
            let Some(reply) = answer(n_requests, &buf[..n]) else {
                continue;
            };
            if n_requests == delayed {
                held.push_back((Instant::now() + delay, reply, from));
            } else {
                socket.send_to(&reply, from).unwrap();
            }
        }
    })
}

/// A sockperf reflector: the request with the reply-request flag (bit 0 of offset 8) cleared.
fn sockperf_reply(request: &[u8]) -> Vec<u8> {
    let mut reply = request.to_vec();
    reply[9] &= !0x01;
    reply
}

/// The counter protocol's answer: the running sum of the increments, as a valid frame.
fn counter_answerer() -> impl FnMut(&[u8]) -> Vec<u8> {
    let mut sum = 0u64;
    move |request| {
        let increment = CounterRepr::parse_bytes(request).unwrap().value;
        sum = sum.wrapping_add(increment);
        CounterRepr { value: sum }.to_bytes().to_vec()
    }
}

/// A TCP counter server: every connection gets replies in order, and the reply to each
/// connection's `held`-th frame is sent `hold` late (the connection stalls meanwhile, as a real
/// stream server's would).
fn tcp_counter_server(held: u64, hold: Duration) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    FakeServer::spawn(listener.local_addr().unwrap(), move |stop| {
        let started = Instant::now();
        let mut connections = Vec::new();
        while running(&stop, started) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let stop = stop.clone();
                    connections.push(std::thread::spawn(move || {
                        serve_counter_stream(stream, held, hold, &stop, started)
                    }));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        for connection in connections {
            let _ = connection.join();
        }
    })
}

fn serve_counter_stream(
    mut stream: TcpStream,
    held: u64,
    hold: Duration,
    stop: &AtomicBool,
    started: Instant,
) {
    stream
        .set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut answer = counter_answerer();
    let mut frame = [0u8; 16];
    let mut n_frames = 0;
    while running(stop, started) {
        match stream.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            // A read timeout: a 16-byte frame from a local client arrives whole in practice.
            Err(_) => continue,
        }
        n_frames += 1;
        let reply = answer(&frame);
        if n_frames == held {
            std::thread::sleep(hold);
        }
        if stream.write_all(&reply).is_err() {
            return;
        }
    }
}

fn bench(args: &[&str]) -> Output {
    Command::new(BIN).arg("bench").args(args).output().unwrap()
}

/// The JSON report, which bench prints whatever its verdict.
fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn absurd_durations_and_rates_are_clear_errors() {
    // Nothing is ever sent: the flags are refused before any socket is opened.
    for (flag, value) in [
        ("--rate", "1e-300"),
        ("--rate", "0"),
        ("--rate", "1e300"),
        ("--rate", "NaN"),
        ("--rate", "fast"),
        ("--duration", "18446744073709551615s"),
        ("--duration", "1e30s"),
        ("--duration", "8d"),
        ("--warmup", "18446744073709551615s"),
        ("--warmup", "2d"),
        ("--timeout", "18446744073709551615s"),
        ("--timeout", "0s"),
        ("--timeout", "2h"),
        ("--hold", "18446744073709551615s"),
        ("--requests", "0"),
    ] {
        let out = bench(&["udp://127.0.0.1:9", flag, value]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{flag} {value}: {err}");
        assert!(
            err.contains(&format!("for '{flag} ")) && err.contains(value),
            "{flag} {value}: the message must name the flag and the value: {err}"
        );
    }
    let err = stderr(&bench(&[
        "udp://127.0.0.1:9",
        "--duration",
        "18446744073709551615s",
    ]));
    assert!(
        err.contains("must be between 1ms and 7d: got 18446744073709551615s"),
        "{err}"
    );
    let err = stderr(&bench(&["udp://127.0.0.1:9", "--rate", "1e-300"]));
    assert!(
        err.contains("must be between 0.01 and 1000000000 requests per second"),
        "{err}"
    );
}

#[test]
fn the_extreme_accepted_values_run() {
    // The slowest rate (one request per 100 s per connection) and the longest timeout: the first
    // request goes at once, and nothing in the schedule or the expiry overflows.
    let mut answer = counter_answerer();
    let server = udp_server(0, Duration::ZERO, move |_, request| Some(answer(request)));
    let out = bench(&[
        &server.spec("udp"),
        "--rate",
        "0.01",
        "--requests",
        "1",
        "--timeout",
        "1h",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = report(&out);
    assert_eq!(r["received"], 1);
    assert_eq!(r["lost"], 0);
}

#[test]
fn too_few_answers_fail_after_the_report() {
    // One request in three is answered: the report is printed, then bench fails.
    let mut answer = counter_answerer();
    let server = udp_server(0, Duration::ZERO, move |n, request| {
        let reply = answer(request);
        (n % 3 == 0).then_some(reply)
    });
    let spec = server.spec("udp");
    let out = bench(&[&spec, "--requests", "9", "--timeout", "50ms", "--json"]);
    let r = report(&out);
    assert_eq!(r["sent"], 9);
    assert_eq!(r["received"], 3);
    assert_eq!(r["lost"], 6);
    assert_eq!(r["invalid_replies"], 0);
    assert!(r["latency_ns"]["p50"].as_u64().unwrap() > 0);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("only 3 of 9 requests were answered (6 lost, 0 unanswered)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_late_sockperf_reply_is_late_not_invalid_at_depth_4() {
    // The reply to sequence 3 comes 500 ms late, after its 200 ms timeout (and within the late
    // window, twice the timeout after it); the other replies come at once, so at depth 4 they
    // overtake it. Sequence numbers match every reply exactly.
    let delay = Duration::from_millis(500);
    let server = udp_server(3, delay, |_, request| Some(sockperf_reply(request)));
    let out = bench(&[
        &server.spec("sockperf+udp"),
        "--timeout",
        "200ms",
        "-d",
        "4",
        "--duration",
        "1s",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = report(&out);
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent > 40, "sent {sent}");
    assert_eq!(r["lost"], 1, "{r}");
    assert_eq!(r["late"], 1, "{r}");
    assert_eq!(r["invalid_replies"], 0, "{r}");
    assert_eq!(r["received"].as_u64(), Some(sent - 1), "{r}");
    assert!(
        r["latency_ns"]["max"].as_u64().unwrap() < 200_000_000,
        "{r}"
    );
}

#[test]
fn a_late_counter_reply_is_never_taken_for_a_newer_one() {
    // Counter replies carry no request id. The reply to the third request comes 500 ms late: the
    // request times out after 200 ms, the client moves to a fresh socket, and the late reply
    // arrives on the old one, where it can only be late.
    let delay = Duration::from_millis(500);
    let mut answer = counter_answerer();
    let server = udp_server(3, delay, move |_, request| Some(answer(request)));
    let out = bench(&[
        &server.spec("udp"),
        "--timeout",
        "200ms",
        "--duration",
        "1s",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = report(&out);
    let sent = r["sent"].as_u64().unwrap();
    assert_eq!(r["lost"], 1, "{r}");
    assert_eq!(r["late"], 1, "{r}");
    assert_eq!(r["invalid_replies"], 0, "{r}");
    assert_eq!(r["non_increasing"], 0, "{r}");
    assert_eq!(r["duplicate_values"], 0, "{r}");
    assert_eq!(r["received"].as_u64(), Some(sent - 1), "{r}");
    // No reply was timed against the wrong request: every latency is far below the delay.
    let max = r["latency_ns"]["max"].as_u64().unwrap();
    assert!(max < 200_000_000, "max latency {max} ns: {r}");
}

#[test]
fn a_stream_request_given_up_on_is_unanswered_not_lost() {
    // The server holds the reply to the third frame 450 ms, past the 300 ms timeout, and still
    // applies it: on a stream the client reports it as unanswered (and its reply as late). The
    // next request, sent at the timeout, is answered 150 ms later, within its own timeout.
    let server = tcp_counter_server(3, Duration::from_millis(450));
    let spec = server.spec("tcp");
    let args = [spec.as_str(), "--timeout", "300ms", "--duration", "1s"];
    let out = bench(&[&args[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let r = report(&out);
    let sent = r["sent"].as_u64().unwrap();
    assert_eq!(r["unanswered"], 1, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["late"], 1, "{r}");
    assert_eq!(r["invalid_replies"], 0, "{r}");
    assert_eq!(r["non_increasing"], 0, "{r}");
    assert_eq!(r["received"].as_u64(), Some(sent - 1), "{r}");

    let out = bench(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains(" unanswered 1 late 1 invalid 0")
            && text.contains("unanswered    1: the server may still have applied them"),
        "{text}"
    );
}

#[test]
fn open_loop_connections_share_one_interval() {
    // 50 connections at 500 requests/s in total: each sends every 100 ms, the connections offset
    // by 2 ms from one another, so one second carries about 500 requests. (Offsetting them by a
    // whole interval each would start the last one 4.9 s late and send about 55.)
    let mut answer = counter_answerer();
    let server = udp_server(0, Duration::ZERO, move |_, request| Some(answer(request)));
    let out = bench(&[
        &server.spec("udp"),
        "-c",
        "50",
        "--rate",
        "500",
        "--duration",
        "1s",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sent = report(&out)["sent"].as_u64().unwrap();
    assert!((450..=550).contains(&sent), "sent {sent}");
}

#[test]
fn a_lost_counter_reply_at_depth_4_keeps_the_counts_exact() {
    // Counter replies carry no request id: at depth 4 the replies after a lost one are matched one
    // request early (their latencies shift), but nothing is invalid and exactly one is lost.
    let mut answer = counter_answerer();
    let server = udp_server(0, Duration::ZERO, move |n, request| {
        let reply = answer(request);
        (n != 3).then_some(reply)
    });
    let out = bench(&[
        &server.spec("udp"),
        "-d",
        "4",
        "--requests",
        "40",
        "--timeout",
        "100ms",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = report(&out);
    assert_eq!(r["sent"], 40, "{r}");
    assert_eq!(r["received"], 39, "{r}");
    assert_eq!(r["lost"], 1, "{r}");
    assert_eq!(r["late"], 0, "{r}");
    assert_eq!(r["invalid_replies"], 0, "{r}");
    assert_eq!(r["non_increasing"], 0, "{r}");
}
