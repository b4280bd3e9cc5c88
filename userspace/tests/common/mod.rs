//! Test helpers: run `ricochet serve` as a child process, read the addresses it bound, stop it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ricochet::wire::CounterRepr;

pub mod postgres;
mod skip;
pub use skip::skip;

pub const BIN: &str = env!("CARGO_BIN_EXE_ricochet");

/// A running server; killed when dropped so a failing test leaves nothing behind.
pub struct Server {
    child: Option<Child>,
    pub listening: Vec<String>,
    stdout: Option<BufReader<std::process::ChildStdout>>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Server::start_in(None, args)
    }

    /// Starts the server inside a network namespace (`ip netns exec` execs into ricochet, so the
    /// child's pid is ricochet's and signals reach it directly).
    pub fn start_in(ns: Option<&str>, args: &[&str]) -> Server {
        Server::start_wrapped(ns, &[], args)
    }

    /// Starts the server through `wrapper` (a command that execs its arguments, such as setpriv),
    /// optionally inside a namespace.
    pub fn start_wrapped(ns: Option<&str>, wrapper: &[&str], args: &[&str]) -> Server {
        let mut argv: Vec<&str> = match ns {
            Some(ns) => vec!["ip", "netns", "exec", ns],
            None => vec![],
        };
        argv.extend_from_slice(wrapper);
        argv.push(BIN);
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]);
        // Parallel tests must not share the default HTTP port.
        let http_default: &[&str] = if args.contains(&"--http") {
            &[]
        } else {
            &["--http", "127.0.0.1:0"]
        };
        let mut child = command
            .arg("serve")
            .args(args)
            .args(http_default)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ricochet");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut listening = Vec::new();
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("ricochet serve exited before it was ready: {status}");
            }
            if let Some(spec) = line.trim().strip_prefix("listening ") {
                listening.push(spec.to_string());
            }
            if let Some(http) = line.trim().strip_prefix("http ") {
                listening.push(format!("http+{http}"));
            }
            if line.starts_with("ready ") {
                break;
            }
        }
        Server {
            child: Some(child),
            listening,
            stdout: Some(stdout),
        }
    }

    /// The bound address of the listener whose spec starts with `prefix` (e.g. "counter+udp").
    pub fn addr(&self, prefix: &str) -> SocketAddr {
        let spec = self.spec(prefix);
        spec.split("://").nth(1).unwrap().parse().unwrap()
    }

    pub fn spec(&self, prefix: &str) -> String {
        self.listening
            .iter()
            .find(|s| s.starts_with(prefix))
            .unwrap_or_else(|| panic!("no listener {prefix} in {:?}", self.listening))
            .clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Reads stdout lines until one starts with `prefix`; returns everything read, that line included.
    pub fn read_until(&mut self, prefix: &str) -> String {
        let stdout = self.stdout.as_mut().expect("running");
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                panic!("ricochet's stdout ended before a line starting with {prefix:?}:\n{text}");
            }
            text.push_str(&line);
            if line.starts_with(prefix) {
                return text;
            }
        }
    }

    /// Sends SIGTERM and returns (exit success, everything printed after start-up).
    pub fn terminate(self) -> (bool, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// Sends `signal` and waits for the process to end; returns (exit success, remaining stdout).
    pub fn signal(mut self, signal: nix::sys::signal::Signal) -> (bool, String) {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "ricochet did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = String::new();
        self.stdout
            .take()
            .unwrap()
            .read_to_string(&mut rest)
            .unwrap();
        (status.success(), rest)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value printed on the `final counter=N` line.
pub fn final_counter(output: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix("final counter="))
        .unwrap_or_else(|| panic!("no final counter in:\n{output}"))
        .trim()
        .parse()
        .unwrap()
}

/// A `key=value` field of the `total` line.
pub fn total_field(output: &str, key: &str) -> u64 {
    let line = output
        .lines()
        .find(|l| l.starts_with("total "))
        .expect("total line");
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

pub fn frame(value: u64) -> [u8; 16] {
    CounterRepr { value }.to_bytes()
}

pub fn parse_reply(bytes: &[u8]) -> u64 {
    CounterRepr::parse_bytes(bytes)
        .expect("a valid reply frame")
        .value
}

/// A small deterministic generator (xorshift64*) so tests are reproducible without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ricochet-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// True when the test runs as root; otherwise skips (or fails under CI, see `skip`).
pub fn require_root(what: &str) -> bool {
    is_root() || skip(&format!("{what} needs root"))
}

/// Skips (with a printed reason) when a tool is missing, unless the run requires every tool
/// (`cargo xtask test` and CI), where a missing tool fails the test.
pub fn require_tool(tool: &str, package: &str) -> bool {
    have(tool)
        || skip(&format!(
            "{tool} not installed (apt-get install {package}; cargo xtask test installs it)"
        ))
}

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Every (increment, reply value) pair a client observed.
pub type Observations = Arc<Mutex<Vec<(u64, u64)>>>;

pub fn udp_client(addr: std::net::SocketAddr, seed: u64, n: usize, seen: Observations) {
    let local = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(local).unwrap();
    socket.connect(addr).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut rng = Rng::new(seed);
    let mut local = Vec::with_capacity(n);
    let mut buf = [0u8; 64];
    for i in 0..n {
        // Every 50th request reads the counter (increment 0).
        let increment = if i % 50 == 49 { 0 } else { 1 + rng.below(1000) };
        socket.send(&frame(increment)).unwrap();
        let got = socket
            .recv(&mut buf)
            .expect("UDP reply within 5 s on loopback");
        assert_eq!(got, 16);
        local.push((increment, parse_reply(&buf[..16])));
    }
    seen.lock().unwrap().extend(local);
}

/// Checks exactness: sorted by value, each reply to a non-zero increment is the previous such value
/// plus its own increment, starting from zero, and no value repeats. Returns the sum of increments.
pub fn check_exact(observations: &[(u64, u64)]) -> u64 {
    let mut adds: Vec<(u64, u64)> = observations
        .iter()
        .copied()
        .filter(|&(inc, _)| inc != 0)
        .collect();
    adds.sort_by_key(|&(_, value)| value);
    let mut running = 0u64;
    for &(increment, value) in &adds {
        assert_eq!(
            value,
            running + increment,
            "reply {value} is not the running sum {running} + its increment {increment}"
        );
        running = value;
    }
    let sum: u64 = adds.iter().map(|&(inc, _)| inc).sum();
    assert_eq!(running, sum);
    // Reads never see a value beyond the final sum.
    for &(_, value) in observations.iter().filter(|&&(inc, _)| inc == 0) {
        assert!(value <= sum);
    }
    sum
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A pair of fresh network namespaces joined by a veth pair, removed on drop (also when the test
/// fails): server side 198.18.0.1/30, client side 198.18.0.2/30, no default route.
pub struct LabNet {
    pub server_ns: String,
    pub client_ns: String,
    pub server_if: String,
    pub client_if: String,
}

pub const LAB_SERVER: &str = "198.18.0.1";
pub const LAB_CLIENT: &str = "198.18.0.2";

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

impl LabNet {
    /// None (with a printed reason) when not root.
    pub fn create(tag: &str, queues: u32) -> Option<LabNet> {
        if !require_root("a lab with network namespaces and XDP") {
            return None;
        }
        let id = std::process::id() % 100_000;
        let lab = LabNet {
            server_ns: format!("ricochet-t{id}-{tag}-srv"),
            client_ns: format!("ricochet-t{id}-{tag}-cli"),
            server_if: format!("rt{id}{tag}s"),
            client_if: format!("rt{id}{tag}c"),
        };
        lab.remove();
        let q = queues.to_string();
        ip(&["netns", "add", &lab.server_ns]);
        ip(&["netns", "add", &lab.client_ns]);
        ip(&[
            "link",
            "add",
            &lab.server_if,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            &lab.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &lab.client_if,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            &lab.client_ns,
        ]);
        for (ns, iface, addr) in [
            (&lab.server_ns, &lab.server_if, LAB_SERVER),
            (&lab.client_ns, &lab.client_if, LAB_CLIENT),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", iface]);
            ip(&["-n", ns, "link", "set", iface, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // XDP_TX replies reach a veth peer only when it runs an XDP program of its own.
        let pass = concat!(env!("OUT_DIR"), "/pass.bpf.o");
        ip(&[
            "-n",
            &lab.client_ns,
            "link",
            "set",
            "dev",
            &lab.client_if,
            "xdpdrv",
            "obj",
            pass,
            "sec",
            "xdp",
        ]);
        Some(lab)
    }

    fn remove(&self) {
        for ns in [&self.server_ns, &self.client_ns] {
            if std::path::Path::new("/run/netns").join(ns).exists() {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    /// Whether an XDP program is attached to the server interface.
    pub fn server_has_xdp(&self) -> bool {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.server_ns,
                "link",
                "show",
                "dev",
                &self.server_if,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    /// Runs a command inside the client namespace and returns (success, stdout + stderr).
    pub fn client_cmd(&self, program: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client_ns, program])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, the peer with it, and any XDP program on them.
        self.remove();
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets it creates live there.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// The lab's counter listener port.
pub const COUNTER_PORT: u16 = 7777;

pub fn addr(port: u16) -> SocketAddr {
    format!("{LAB_SERVER}:{port}").parse().unwrap()
}

pub fn bench_json_in(lab: &LabNet, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["bench"];
    full.extend_from_slice(args);
    full.push("--json");
    let (ok, out) = lab.client_cmd(BIN, &full);
    assert!(ok, "bench {args:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bench JSON: {e}: {out}"))
}

pub fn exactness_in_lab(lab: &LabNet) -> u64 {
    // Lab clients on many flows (the veth spreads them over both queues by flow hash) and loopback
    // clients inside the responder namespace (kernel path), all at once on one counter.
    let seen: Observations = Arc::default();
    let mut threads = Vec::new();
    for c in 0..16u64 {
        let seen = seen.clone();
        threads.push(in_netns(&lab.client_ns, move || {
            udp_client(addr(COUNTER_PORT), 1000 + c, 300, seen)
        }));
    }
    for c in 0..2u64 {
        let seen = seen.clone();
        threads.push(in_netns(&lab.server_ns, move || {
            udp_client(addr(COUNTER_PORT), 2000 + c, 300, seen)
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 18 * 300);
    check_exact(&seen)
}

pub fn invalid_requests_are_never_answered(lab: &LabNet) {
    let handle = in_netns(&lab.client_ns, || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(addr(COUNTER_PORT)).unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        // A read first, so the neighbour entry exists and nothing below waits for ARP.
        socket.send(&frame(0)).unwrap();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        let before = parse_reply(&buf[..n]);
        for bytes in [
            &b"aaaaaaaaaaaaaaaa"[..],
            &[0u8; 16][..],
            &[0xff; 16][..],
            &frame(1)[..15],
            &[1u8][..],
        ] {
            socket.send(bytes).unwrap();
        }
        socket.send(&frame(0)).unwrap();
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(
            parse_reply(&buf[..n]),
            before,
            "invalid requests changed the counter"
        );
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            socket.recv(&mut buf).is_err(),
            "an invalid request was answered"
        );
    });
    handle.join().unwrap();
}

/// What both bypass modes must do in the lab while attached: exact counting over many flows and the
/// kernel path at once, invalid requests never answered, 20,000 verified bench requests (increment 3),
/// TCP and ping still working. Returns the counter the server must end with.
pub fn bypass_serves_the_lab(lab: &LabNet) -> u64 {
    let sum = exactness_in_lab(lab);
    invalid_requests_are_never_answered(lab);
    port_zero_is_never_applied(lab);
    let spec = format!("udp://{LAB_SERVER}:{COUNTER_PORT}");
    let r = bench_json_in(
        lab,
        &[
            &spec,
            "-c",
            "32",
            "-d",
            "4",
            "--requests",
            "20000",
            "--increment",
            "3",
            "--timeout",
            "2s",
        ],
    );
    assert_eq!(
        (
            r["sent"].as_u64(),
            r["received"].as_u64(),
            r["lost"].as_u64()
        ),
        (Some(20000), Some(20000), Some(0))
    );
    assert_eq!(r["duplicate_values"], 0);
    assert_eq!(r["non_increasing"], 0);
    // TCP keeps working while attached (TCP-lite in the AF_XDP workers or in the XDP program),
    // and so does ICMP.
    let tcp = format!("tcp://{LAB_SERVER}:{COUNTER_PORT}");
    let t = bench_json_in(lab, &[&tcp, "--requests", "100"]);
    assert_eq!(t["received"], 100);
    if require_tool("ping", "iputils-ping") {
        let (ok, out) = lab.client_cmd("ping", &["-c", "2", "-W", "2", LAB_SERVER]);
        assert!(ok, "ping to the responder failed while attached: {out}");
    }
    sum + 3 * 20000 + 100
}

/// Sends one UDP datagram from source port 0 through a raw socket (the kernel builds the IP header).
/// No reply can ever be addressed to it.
pub fn send_from_port_zero(to: SocketAddr, payload: &[u8]) {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::UDP),
    )
    .expect("a raw socket (needs root)");
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&0u16.to_be_bytes());
    datagram.extend_from_slice(&to.port().to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&0u16.to_be_bytes()); // no checksum, which IPv4 allows
    datagram.extend_from_slice(payload);
    let dest = SocketAddr::new(to.ip(), 0);
    socket.send_to(&datagram, &dest.into()).unwrap();
}

/// A datagram from source port 0 is never answered and never counted: the counter read before and
/// after it is the same.
pub fn port_zero_is_never_applied(lab: &LabNet) {
    in_netns(&lab.client_ns, || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(addr(COUNTER_PORT)).unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 64];
        socket.send(&frame(0)).unwrap();
        let n = socket.recv(&mut buf).unwrap();
        let before = parse_reply(&buf[..n]);
        send_from_port_zero(addr(COUNTER_PORT), &frame(1000));
        std::thread::sleep(Duration::from_millis(100));
        socket.send(&frame(0)).unwrap();
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(
            parse_reply(&buf[..n]),
            before,
            "a request from source port 0 was applied"
        );
    })
    .join()
    .unwrap();
}

/// GET `path` on a fresh connection: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut conn = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("GET {path}: cannot connect to {addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    BufReader::new(conn).read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().unwrap();
    let body = reply.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// `systemd-analyze verify UNIT` (with `unit_path` as SYSTEMD_UNIT_PATH, for templates and drop-ins)
/// must pass with no warning: verify exits 0 on unknown keys and unparsable values and only warns.
pub fn assert_unit_verifies(unit: &std::path::Path, unit_path: Option<&std::path::Path>) {
    let mut command = Command::new("systemd-analyze");
    command.arg("verify").arg(unit);
    if let Some(dir) = unit_path {
        command.env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()));
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

/// One HTTP/1.1 request on `stream` (Connection: close): (status, body).
pub fn http_exchange(
    mut stream: impl Read + Write,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (
        status,
        reply
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string(),
    )
}
