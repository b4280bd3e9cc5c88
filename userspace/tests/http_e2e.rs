//! The HTTP endpoints end to end: every endpoint and error path, keep-alive and pipelining, HTTP and
//! UDP increments on one exact counter, the Prometheus output through a real parser, CPU profiles,
//! and the dashboard in headless Chromium.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn http_addr(server: &Server) -> SocketAddr {
    let spec = server.spec("http+http://");
    spec.trim_start_matches("http+http://").parse().unwrap()
}

/// One parsed HTTP response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Reads one response (Content-Length framed) from a keep-alive connection.
fn read_reply(reader: &mut BufReader<TcpStream>) -> Reply {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    assert!(
        status_line.starts_with("HTTP/1.1 "),
        "bad status line {status_line:?}"
    );
    let status: u16 = status_line[9..12].parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

fn connect(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

/// Sends raw bytes on a fresh connection and reads one response.
fn raw(addr: SocketAddr, bytes: &[u8]) -> Reply {
    let (mut s, mut r) = connect(addr);
    s.write_all(bytes).unwrap();
    read_reply(&mut r)
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
}

fn post(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: &[u8],
    token: Option<&str>,
) -> Reply {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{auth}\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw(addr, &req)
}

#[test]
fn every_endpoint_answers() {
    let server = Server::start(&["--listen", "udp://127.0.0.1:0"]);
    let addr = http_addr(&server);

    let r = get(addr, "/healthz");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = get(addr, "/readyz");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ready"], true);

    let r = get(addr, "/counter");
    assert_eq!(r.json()["value"], 0);
    let r = post(
        addr,
        "/counter",
        "application/json",
        br#"{"increment": 40}"#,
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["value"], 40);
    let r = post(
        addr,
        "/counter",
        "application/octet-stream",
        &frame(2),
        None,
    );
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("application/octet-stream"))
    );
    assert_eq!(parse_reply(&r.body), 42);
    assert_eq!(get(addr, "/counter").json()["value"], 42);

    let stats = get(addr, "/stats").json();
    assert_eq!(stats["mode"], "kernel");
    assert_eq!(stats["counter"], 42);
    assert!(!stats["workers"].as_array().unwrap().is_empty());
    assert!(stats["metrics"]
        .as_str()
        .unwrap()
        .contains("ricochet_counter"));
    assert!(stats["uptime_s"].as_f64().unwrap() >= 0.0);

    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("id=\"counter\""));

    // HEAD: the headers of a GET, no body.
    let (mut s, mut reader) = connect(addr);
    s.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut head = String::new();
    reader.read_to_string(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
}

#[test]
fn metrics_parse_with_a_real_parser() {
    let server = Server::start(&["--listen", "udp://127.0.0.1:0"]);
    let addr = http_addr(&server);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.connect(server.addr("counter+udp")).unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        udp.send(&frame(3)).unwrap();
        udp.recv(&mut buf).unwrap();
    }
    udp.send(b"aaaaaaaaaaaaaaaa").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = get(addr, "/healthz");
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    let text = r.text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(value("ricochet_counter", &[]), 15.0);
    assert_eq!(
        value("ricochet_requests_total", &[("datapath", "kernel")]),
        6.0
    );
    assert_eq!(
        value("ricochet_replies_total", &[("datapath", "kernel")]),
        5.0
    );
    assert_eq!(
        value("ricochet_drops_total", &[("reason", "bad_hash")]),
        1.0
    );
    assert!(
        value(
            "ricochet_http_requests_total",
            &[("route", "/healthz"), ("status", "200")]
        ) >= 1.0
    );
    assert!(text.contains("ricochet_http_request_duration_seconds_bucket"));
    assert!(text.contains("ricochet_build_info{"));
    assert!(text.trim_end().ends_with("# EOF"));
}

/// The samples of one scrape, by metric name and labels.
fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let text = get(addr, "/metrics").text();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("the exposition parses")
}

/// Every statistic of a worker record, described once in `StatsSnapshot::fields` and
/// `DropReason::ALL`, is in both /metrics and /stats for every worker.
#[test]
fn every_statistic_is_in_metrics_and_stats() {
    use ricochet::stats::{DropReason, FieldKind, StatsSnapshot};
    let server = Server::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tcp://127.0.0.1:0",
    ]);
    let addr = http_addr(&server);
    let scrape = scrape(addr);
    let stats = get(addr, "/stats").json();
    let workers = stats["workers"].as_array().unwrap();
    assert!(!workers.is_empty());
    let sample = |metric: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .any(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    };
    for field in StatsSnapshot::default().fields() {
        let metric = match field.kind {
            FieldKind::Counter => format!("ricochet_{}_total", field.name),
            FieldKind::Gauge => format!("ricochet_{}", field.name),
        };
        for w in workers {
            let id = w["id"].to_string();
            assert!(
                sample(&metric, &[("datapath", "kernel"), ("worker", &id)]),
                "{metric} of kernel worker {id} is not in /metrics"
            );
            assert!(
                w[field.name].is_u64(),
                "{} is not in /stats: {w}",
                field.name
            );
        }
        assert!(
            stats["http_counter"][field.name].is_u64(),
            "{} is not in /stats http_counter",
            field.name
        );
    }
    for reason in DropReason::ALL {
        for w in workers {
            let id = w["id"].to_string();
            assert!(
                sample(
                    "ricochet_drops_total",
                    &[("worker", &id), ("reason", reason.as_str())]
                ),
                "drop reason {reason} of worker {id} is not in /metrics"
            );
            assert!(
                w["drops"][reason.as_str()].is_u64(),
                "drop reason {reason} is not in /stats"
            );
        }
    }
    let http_fields = ricochet::http::state::HttpConnStats::default().fields();
    let names: Vec<&str> = http_fields.iter().map(|f| f.name).collect();
    for name in [
        "http_conns_refused",
        "http_pending_rejected",
        "http_pending_bytes",
        "http_pending_limit_bytes",
    ] {
        assert!(names.contains(&name), "{name} is no longer described");
    }
    for field in http_fields {
        let name = field.name;
        let metric = match field.kind {
            FieldKind::Counter => format!("ricochet_{name}_total"),
            FieldKind::Gauge => format!("ricochet_{name}"),
        };
        assert!(sample(&metric, &[]), "{metric} is not in /metrics");
        assert!(stats["http"][name].is_u64(), "{name} is not in /stats");
    }
}

#[test]
fn error_paths() {
    let server = Server::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--http-token",
        "s3cret",
        "--http-header-timeout",
        "1s",
    ]);
    let addr = http_addr(&server);
    assert_eq!(get(addr, "/nope").status, 404);
    let r = raw(addr, b"DELETE /counter HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        (r.status, r.header("allow")),
        (405, Some("GET, HEAD, POST"))
    );
    // Token: missing, wrong, right.
    assert_eq!(
        post(
            addr,
            "/counter",
            "application/json",
            br#"{"increment": 1}"#,
            None
        )
        .status,
        401
    );
    assert_eq!(
        post(
            addr,
            "/counter",
            "application/json",
            br#"{"increment": 1}"#,
            Some("s3cre7")
        )
        .status,
        401
    );
    assert_eq!(
        post(
            addr,
            "/counter",
            "application/json",
            br#"{"increment": 1}"#,
            Some("s3cret")
        )
        .status,
        200
    );
    assert_eq!(get(addr, "/debug/pprof/profile?seconds=1").status, 401);
    // Bad bodies change nothing.
    for (ct, body) in [
        ("application/json", &b"{\"increment\": -1}"[..]),
        ("application/json", &b"{\"increment\": \"7\"}"[..]),
        ("application/json", &b"not json"[..]),
        ("application/octet-stream", &b"aaaaaaaaaaaaaaaa"[..]),
        ("application/octet-stream", &b"short"[..]),
    ] {
        let r = post(addr, "/counter", ct, body, Some("s3cret"));
        assert_eq!(r.status, 400, "{ct} {body:?}");
        assert!(r.json()["error"].is_string());
    }
    assert_eq!(
        post(addr, "/counter", "text/plain", b"1", Some("s3cret")).status,
        415
    );
    assert_eq!(get(addr, "/counter").json()["value"], 1);
    // Limits.
    let r = raw(addr, b"POST /counter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n");
    assert_eq!(r.status, 413);
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(raw(addr, big.as_bytes()).status, 431);
    let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
    assert_eq!(
        raw(
            addr,
            format!("GET /healthz HTTP/1.1\r\n{many}\r\n").as_bytes()
        )
        .status,
        431
    );
    assert_eq!(raw(addr, b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n").status, 400);
    assert_eq!(
        raw(
            addr,
            b"POST /counter HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .status,
        501
    );
    assert_eq!(get(addr, "/debug/pprof/profile?seconds=99").status, 401);
    // Slowloris: a request line that never ends gets 408 after the header timeout.
    let (mut s, mut reader) = connect(addr);
    s.write_all(b"GET /healthz HTT").unwrap();
    let started = Instant::now();
    let r = read_reply(&mut reader);
    assert_eq!(r.status, 408);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(server.terminate().0);
}

/// Sends `head`, then one byte of `trickle` every 0.5 s until the server answers or closes, and
/// returns the status it answered with and how long after the first byte.
fn trickle(addr: SocketAddr, head: &'static [u8], trickle: &'static [u8]) -> (u16, Duration) {
    let (mut s, mut r) = connect(addr);
    let started = Instant::now();
    s.write_all(head).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for byte in trickle.iter().cycle().take(40) {
            std::thread::sleep(Duration::from_millis(500));
            if writer.write_all(std::slice::from_ref(byte)).is_err() {
                return;
            }
        }
    });
    let status = read_reply(&mut r).status;
    let elapsed = started.elapsed();
    drop((s, r));
    let _ = sender.join();
    (status, elapsed)
}

/// Slowloris: the request deadline runs from a request's first byte over its line, headers and
/// body; bytes trickling in never restart it.
#[test]
fn a_request_trickled_byte_by_byte_times_out_on_time() {
    let server = Server::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--http-header-timeout",
        "2s",
    ]);
    let addr = http_addr(&server);
    // A header that never ends, and a body that never completes, one byte every 0.5 s.
    let slow_head =
        std::thread::spawn(move || trickle(addr, b"GET /healthz HTTP/1.1\r\nX-Pad: ", b"abcdefgh"));
    let slow_body = std::thread::spawn(move || {
        let head = b"POST /counter HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
        trickle(addr, head, b" ")
    });
    for (what, handle) in [("header", slow_head), ("body", slow_body)] {
        let (status, elapsed) = handle.join().unwrap();
        assert_eq!(status, 408, "a trickled {what}");
        // 2 s of deadline, swept once a second.
        assert!(
            elapsed < Duration::from_millis(4_500),
            "a trickled {what} got its 408 after {elapsed:?}"
        );
    }
    assert_eq!(get(addr, "/counter").json()["value"], 0);
}

/// `--http-max-pending` bounds the bytes all partial requests hold together: clients holding
/// partial bodies beyond it get 503 and are closed; what was refused is in /metrics.
#[test]
fn partial_requests_beyond_max_pending_get_503() {
    let server = Server::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--http-max-pending",
        "262144",
    ]);
    let addr = http_addr(&server);
    let head = b"POST /counter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 65536\r\n\r\n";
    // Ten clients each send 60,000 of the 65,536 body bytes they announce, and wait.
    let clients: Vec<(TcpStream, BufReader<TcpStream>)> = (0..10)
        .map(|_| {
            let (mut s, r) = connect(addr);
            s.write_all(head).unwrap();
            s.write_all(&[b' '; 60_000]).unwrap();
            (s, r)
        })
        .collect();
    let sample = |metrics: &str, name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // Wait until the server has read or refused every partial body.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = get(addr, "/metrics").text();
        let held = sample(&metrics, "ricochet_http_pending_bytes ") / 60_000;
        if held + sample(&metrics, "ricochet_http_pending_rejected_total ") >= 10 {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "partial bodies still unread:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut refused = 0;
    for (s, mut r) in clients {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut line = String::new();
        if r.read_line(&mut line).is_ok() && !line.is_empty() {
            assert!(line.starts_with("HTTP/1.1 503 "), "{line:?}");
            refused += 1;
        }
    }
    // 256 KiB holds four partial bodies of 60,000 bytes (in buffers of up to 64 KiB), not five.
    assert!((6..=7).contains(&refused), "{refused} of 10 refused");
    assert_eq!(
        sample(&metrics, "ricochet_http_pending_rejected_total "),
        refused
    );
    assert_eq!(
        sample(&metrics, "ricochet_http_pending_limit_bytes "),
        262144
    );
    assert_eq!(get(addr, "/counter").json()["value"], 0);
}

#[test]
fn non_loopback_needs_a_token_and_rate_limit_answers_429() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "udp://127.0.0.1:0",
            "--http",
            "0.0.0.0:0",
        ])
        .env_remove("RICOCHET_HTTP_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--http-token"));

    let server = Server::start(&["--listen", "udp://127.0.0.1:0", "--http-rate-limit", "5"]);
    let addr = http_addr(&server);
    let (mut s, mut r) = connect(addr);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        statuses.push(read_reply(&mut r).status);
    }
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
}

#[test]
fn keep_alive_and_pipelining() {
    let server = Server::start(&["--listen", "udp://127.0.0.1:0"]);
    let addr = http_addr(&server);
    let (mut s, mut r) = connect(addr);
    // Three requests in one write, answered in order on one connection.
    let body = br#"{"increment": 5}"#;
    let mut batch = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    batch.extend_from_slice(
        format!("POST /counter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
    );
    batch.extend_from_slice(body);
    batch.extend_from_slice(b"GET /counter HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(&batch).unwrap();
    assert_eq!(read_reply(&mut r).text(), "ok\n");
    assert_eq!(read_reply(&mut r).json()["value"], 5);
    assert_eq!(read_reply(&mut r).json()["value"], 5);
    // The connection stays open: a request split across writes still works.
    s.write_all(b"GET /coun").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(b"ter HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_reply(&mut r).json()["value"], 5);
    // Connection: close is honoured.
    s.write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let last = read_reply(&mut r);
    assert_eq!(last.header("connection"), Some("close"));
    let mut rest = Vec::new();
    assert_eq!(r.read_to_end(&mut rest).unwrap(), 0);
}

/// Request smuggling (RFC 9112 section 6.3): a request whose length two readers could disagree on
/// is refused, and what follows it on the connection is never executed.
#[test]
fn ambiguous_content_length_is_refused_and_nothing_is_smuggled() {
    let server = Server::start(&["--listen", "udp://127.0.0.1:0"]);
    let addr = http_addr(&server);
    let body = br#"{"increment": 7}"#;
    let smuggled = format!(
        "POST /counter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut smuggled = smuggled.into_bytes();
    smuggled.extend_from_slice(body);
    let lengths = [
        format!("Content-Length: {}\r\nContent-Length: 0", smuggled.len()),
        format!("Content-Length: 0\r\nContent-Length: {}", smuggled.len()),
        format!("Content-Length: +{}", smuggled.len()),
        format!("Content-Length: 0, {}", smuggled.len()),
    ];
    for length in lengths {
        let (mut s, mut r) = connect(addr);
        let mut request =
            format!("GET /counter HTTP/1.1\r\nHost: x\r\n{length}\r\n\r\n").into_bytes();
        request.extend_from_slice(&smuggled);
        s.write_all(&request).unwrap();
        let reply = read_reply(&mut r);
        assert_eq!(reply.status, 400, "{length:?}: {}", reply.text());
        assert_eq!(reply.header("connection"), Some("close"));
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "{length:?}: a second reply {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    assert_eq!(
        get(addr, "/counter").json()["value"],
        0,
        "a smuggled request ran"
    );
    // Identical values are one length: the body is read, the next request runs.
    let mut request =
        b"POST /counter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".to_vec();
    request.extend_from_slice(
        format!(
            "Content-Length: {0}\r\nContent-Length: {0}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    request.extend_from_slice(body);
    assert_eq!(raw(addr, &request).json()["value"], 7);
    // `Connection` is a token list: `Upgrade, close` closes after the reply.
    let (mut s, mut r) = connect(addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut r).header("connection"), Some("close"));
    let mut rest = Vec::new();
    assert_eq!(r.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn http_and_udp_increments_sum_exactly() {
    let server = Server::start(&["--listen", "udp://127.0.0.1:0"]);
    let addr = http_addr(&server);
    let udp = server.addr("counter+udp");
    let seen: Observations = Arc::default();
    let http_sum = Arc::new(Mutex::new(0u64));
    let mut threads = Vec::new();
    for c in 0..4u64 {
        let seen = seen.clone();
        threads.push(std::thread::spawn(move || {
            udp_client(udp, 500 + c, 500, seen)
        }));
    }
    for c in 0..4u64 {
        let http_sum = http_sum.clone();
        let seen = seen.clone();
        threads.push(std::thread::spawn(move || {
            let (mut s, mut r) = connect(addr);
            let mut rng = Rng::new(900 + c);
            for _ in 0..200 {
                let inc = 1 + rng.below(1000);
                let body = format!("{{\"increment\": {inc}}}");
                s.write_all(
                    format!("POST /counter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                        .as_bytes(),
                )
                .unwrap();
                let reply = read_reply(&mut r);
                assert_eq!(reply.status, 200);
                let value = reply.json()["value"].as_u64().unwrap();
                *http_sum.lock().unwrap() += inc;
                seen.lock().unwrap().push((inc, value));
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let sum = check_exact(&seen.lock().unwrap());
    assert_eq!(get(addr, "/counter").json()["value"].as_u64().unwrap(), sum);
    let (ok, output) = server.terminate();
    assert!(ok);
    assert_eq!(final_counter(&output), sum);
}

#[test]
fn cpu_profiles() {
    let server = Server::start(&["--listen", "udp://127.0.0.1:0"]);
    let addr = http_addr(&server);
    let r = get(addr, "/debug/pprof/profile?seconds=1");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    // A pprof Profile message starts with field 1 (sample_type, length-delimited): tag 0x0a.
    assert!(
        !r.body.is_empty() && r.body[0] == 0x0a,
        "not a pprof protobuf"
    );
    let r = get(addr, "/debug/pprof/profile?seconds=1&format=flamegraph");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("<svg"), "not an SVG: {}", r.text());
    assert_eq!(get(addr, "/debug/pprof/profile?seconds=0").status, 400);
    assert_eq!(get(addr, "/debug/pprof/profile?seconds=61").status, 400);
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A CPU profile gives back the memory its symbolization took (it used to keep about 200 MB for the
/// rest of the process's life). What stays is pprof's sample table, reused by every later profile.
#[test]
fn cpu_profiles_give_their_memory_back() {
    let server = Server::start(&["--listen", "udp://127.0.0.1:0"]);
    let addr = http_addr(&server);
    let before = rss_kib(server.pid());
    for query in ["seconds=1", "seconds=1&format=flamegraph", "seconds=1"] {
        let path = format!("/debug/pprof/profile?{query}");
        assert_eq!(get(addr, &path).status, 200, "{path}");
    }
    let grown = rss_kib(server.pid()).saturating_sub(before);
    // pprof 0.15's collector (collector.rs): 4,096 buckets of 4 entries, each a stack of
    // MAX_DEPTH frames, allocated at the first profile and kept.
    let frame = std::mem::size_of::<backtrace::Frame>();
    let table = (4096 * 4 * pprof::MAX_DEPTH * frame / 1024) as u64;
    assert!(
        grown < table + 30 * 1024,
        "RSS grew by {grown} KiB over three profiles; pprof's own table is {table} KiB"
    );
}

/// A minimal WebDriver client: JSON over HTTP/1.1 with Connection: close.
fn webdriver(
    port: u16,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // chromedriver may keep the connection open: frame the reply by its Content-Length.
    let reply = read_reply(&mut BufReader::new(s));
    serde_json::from_slice(&reply.body)
        .unwrap_or_else(|e| panic!("chromedriver answered {}: {e}", reply.text()))
}

/// A headless Chromium session behind its own chromedriver. Dropping it ends the session, kills
/// chromedriver (and with it the browser) however the test ends, and removes the profile.
struct Browser {
    driver: std::process::Child,
    port: u16,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// None when chromium or chromedriver is missing (the test skips, or fails where skips must).
    /// `tag` names the profile directory: tests running in parallel must not share one.
    fn start(tag: &str) -> Option<Browser> {
        if !require_tool("chromium", "chromium") || !require_tool("chromedriver", "chromium-driver")
        {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let profile = temp_path(&format!("chromium-profile-{tag}"));
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let session = webdriver(
            port,
            "POST",
            "/session",
            Some(
                serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             format!("--user-data-dir={}", browser.profile.display())]
                }}}}),
            ),
        );
        browser.session = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {session}"))
            .to_string();
        Some(browser)
    }

    /// A command on this session: `path` follows `/session/{id}`.
    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let path = format!("/session/{}{path}", self.session);
        webdriver(self.port, method, &path, body)
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", Some(serde_json::json!({ "url": url })));
    }

    /// The WebDriver id of the element `css` selects.
    fn element(&self, css: &str) -> String {
        let found = self.call(
            "POST",
            "/element",
            Some(serde_json::json!({"using": "css selector", "value": css})),
        );
        found["value"]["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css} on the page: {found}"))
            .to_string()
    }

    /// The rendered text of `css` (empty while it is hidden).
    fn text(&self, css: &str) -> String {
        let id = self.element(css);
        self.call("GET", &format!("/element/{id}/text"), None)["value"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let id = self.element(css);
        self.call("GET", &format!("/element/{id}/attribute/{name}"), None)["value"]
            .as_str()
            .map(str::to_string)
    }

    fn displayed(&self, css: &str) -> bool {
        let id = self.element(css);
        let reply = self.call("GET", &format!("/element/{id}/displayed"), None);
        reply["value"]
            .as_bool()
            .unwrap_or_else(|| panic!("displayed {css}: {reply}"))
    }

    /// Polls the text of `css` until `check` holds (within 15 s: the slowest part of the page
    /// refreshes every 5 s); returns it. `what` says what was expected when it never does.
    fn wait_for_text(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.text(css);
            if check(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "the page's {css} shows {got:?}, expected {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session quits the browser (killing chromedriver alone leaves it running and
        // writing its profile). This runs while a failed test unwinds too, so it must not panic:
        // chromedriver answers once the browser is gone, and any failure here is ignored.
        if !self.session.is_empty() {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                let request = format!(
                    "DELETE /session/{} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    self.session
                );
                if s.write_all(request.as_bytes()).is_ok() {
                    let _ = s.read(&mut [0u8; 1024]);
                }
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[test]
fn dashboard_shows_the_counter_changing_in_headless_chromium() {
    let server = Server::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tcp://127.0.0.1:0",
    ]);
    let addr = http_addr(&server);
    let Some(browser) = Browser::start("counter") else {
        return;
    };
    browser.open(&format!("http://{addr}/"));
    browser.wait_for_text("#counter", "0", |t| t == "0");
    // Counter requests over UDP; the page must follow.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.connect(server.addr("counter+udp")).unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..7 {
        udp.send(&frame(6)).unwrap();
        udp.recv(&mut buf).unwrap();
    }
    browser.wait_for_text("#counter", "42", |t| t == "42");
    // An open TCP connection shows in the connections panel.
    browser.wait_for_text("#conns-open", "0", |t| t == "0");
    let tcp = std::net::TcpStream::connect(server.addr("counter+tcp")).unwrap();
    browser.wait_for_text("#conns-open", "1", |t| t == "1");
    drop(tcp);
    browser.wait_for_text("#conns-open", "0 again", |t| t == "0");
    // Without --state-dir, /summary answers 404: "Last hour" says what it needs, and draws nothing.
    browser.wait_for_text("#hour-note", "a note naming --state-dir", |t| {
        t.contains("--state-dir")
    });
    assert!(!browser.displayed("#hour-chart"));
    assert_eq!(
        browser.attribute("#hour-chart", "data-points").as_deref(),
        Some("0")
    );
}

/// A directory removed when the test ends, however it ends.
struct TempDir(PathBuf);

impl TempDir {
    fn fresh(name: &str) -> TempDir {
        let dir = temp_path(name);
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// "Last hour" on the dashboard shows exactly the totals /summary reports for the hour, and charts
/// its recorded seconds.
#[test]
fn dashboard_shows_the_last_hour_of_summary_in_headless_chromium() {
    // Declared first, so it is removed after the server that writes into it has stopped.
    let state = TempDir::fresh("dashboard-history");
    let server = Server::start(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--state-dir",
        state.0.to_str().unwrap(),
    ]);
    let addr = http_addr(&server);
    let Some(browser) = Browser::start("hour") else {
        return;
    };
    // 30 valid requests with increments 1..=30, every reply checked, and 4 with a wrong hash.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.connect(server.addr("counter+udp")).unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    let mut sum = 0;
    for increment in 1..=30u64 {
        udp.send(&frame(increment)).unwrap();
        let n = udp.recv(&mut buf).unwrap();
        sum += increment;
        assert_eq!(parse_reply(&buf[..n]), sum);
    }
    for increment in 1..=4u64 {
        let mut bad = frame(increment);
        bad[15] ^= 0xff;
        udp.send(&bad).unwrap();
    }
    // The history writes a second about a second after it ends.
    let deadline = Instant::now() + Duration::from_secs(15);
    let summary = loop {
        let summary = get(addr, "/summary").json();
        let total = &summary["total"];
        if total["increments"] == sum
            && total["requests"] == 34
            && total["replies"] == 30
            && total["drops"]["bad_hash"] == 4
        {
            break summary;
        }
        assert!(
            Instant::now() < deadline,
            "/summary never reported the traffic: {summary}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let total = &summary["total"];
    let drops: u64 = total["drops"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();

    browser.open(&format!("http://{addr}/"));
    let requests = total["requests"].to_string();
    browser.wait_for_text("#hour-requests", &requests, |t| t == requests);
    assert_eq!(
        browser.text("#hour-increments"),
        total["increments"].to_string()
    );
    assert_eq!(browser.text("#hour-replies"), total["replies"].to_string());
    assert_eq!(browser.text("#hour-drops"), drops.to_string());
    assert_eq!(browser.text("#hour-drop-reasons"), "bad_hash 4");
    assert!(!browser.displayed("#hour-note"));
    assert!(browser.displayed("#hour-chart"));
    // At least the seconds of the traffic were drawn, and never more than an hour of them.
    let points: u64 = browser
        .attribute("#hour-chart", "data-points")
        .expect("the chart says how many points it drew")
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&points), "{points} points drawn");
}

/// A client that pipelines many requests and does not read its replies costs the server a bounded
/// amount of memory (the replies waiting are capped; the unanswered requests stay in the budgeted
/// partial buffer), and still gets every reply, in order, once it reads.
#[test]
fn pipelined_requests_from_a_client_that_does_not_read_are_bounded() {
    let server = Server::start(&["--listen", "udp://127.0.0.1:0"]);
    let addr = http_addr(&server);
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let per_connection = 16 * 1024 / request.len();
    let burst: Vec<u8> = request.repeat(per_connection);
    let before = rss_kib(server.pid());
    let mut held = Vec::new();
    for _ in 0..20 {
        // A small receive buffer, so the replies cannot hide in the kernel's socket memory.
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        let mut s: TcpStream = socket.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        s.write_all(&burst).unwrap();
        held.push((s, r));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let grown = rss_kib(server.pid()).saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB for 20 connections that pipeline and do not read"
    );
    // Every request is still answered, in order, once the client reads.
    let (_, reader) = &mut held[0];
    for i in 0..per_connection {
        let reply = read_reply(reader);
        assert_eq!(reply.status, 200, "reply {i}");
        assert!(reply.text().contains("ricochet_requests"), "reply {i}");
    }
}
