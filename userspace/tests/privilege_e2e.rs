//! Least privilege and the service manager: once set up, every thread of a server holds no
//! capability (or only CAP_IPC_LOCK with --mlock), has no_new_privs and, with --user, runs as that
//! user, while every datapath and endpoint keeps working; the systemd unit's capability set is
//! enough to start a bypass datapath without root; READY=1 and STOPPING=1 reach $NOTIFY_SOCKET; the
//! unit passes systemd-analyze verify.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use ricochet::privilege::ThreadCreds;

const NOBODY: u32 = 65534;
const CAP_IPC_LOCK: u64 = 1 << 14;

/// Every thread's credentials.
fn threads_of(pid: i32) -> Vec<ThreadCreds> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(entry.unwrap().path().join("status")).unwrap();
        all.push(ThreadCreds::parse(&status).expect("a task status"));
    }
    all
}

/// Asserts that every thread keeps exactly `kept` capabilities, has no_new_privs and runs as `uid`.
fn assert_locked_down(pid: i32, kept: u64, uid: u32) {
    let threads = threads_of(pid);
    assert!(threads.len() >= 3, "{threads:?}");
    for t in &threads {
        let sets = [t.permitted, t.effective, t.bounding];
        assert_eq!(sets, [kept; 3], "thread {} keeps more: {t:?}", t.name);
        assert_eq!((t.inheritable, t.ambient), (0, 0), "{t:?}");
        assert!(t.no_new_privs, "thread {} has no no_new_privs", t.name);
        assert_eq!(t.uids, [uid; 4], "thread {} runs as {:?}", t.name, t.uids);
    }
}

/// One HTTP request to the server's endpoint on loopback inside `ns`: (status, body).
fn http_in(ns: &str, server: &Server, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = server
        .spec("http+http://")
        .trim_start_matches("http+http://")
        .parse()
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = in_netns(ns, move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut response = Vec::new();
        s.read_to_end(&mut response).unwrap();
        response
    })
    .join()
    .unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text[9..12].parse().unwrap();
    (status, text.split_once("\r\n\r\n").unwrap().1.to_string())
}

/// Every endpoint answers; POST /counter adds 5. Returns the increment applied.
fn every_endpoint_answers(ns: &str, server: &Server, uid: u32) -> u64 {
    for path in ["/healthz", "/readyz", "/metrics", "/counter", "/"] {
        assert_eq!(http_in(ns, server, "GET", path, "").0, 200, "GET {path}");
    }
    let (status, body) = http_in(ns, server, "POST", "/counter", "{\"increment\": 5}");
    assert_eq!(status, 200, "POST /counter: {body}");
    let (status, profile) = http_in(ns, server, "GET", "/debug/pprof/profile?seconds=1", "");
    assert_eq!(
        status, 200,
        "the profiler works without privileges: {profile}"
    );
    let (status, stats) = http_in(ns, server, "GET", "/stats", "");
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let privileges = &stats["started_as"]["privileges"];
    assert_eq!(privileges["no_new_privs"], true, "{privileges}");
    assert_eq!(privileges["uid"], uid, "{privileges}");
    5
}

fn lab_server(lab: &LabNet, mode: &str, wrapper: &[&str], extra: &[&str]) -> Server {
    let counter = format!("udp://{LAB_SERVER}:{COUNTER_PORT}");
    let tcp = format!("tcp://{LAB_SERVER}:{COUNTER_PORT}");
    let mut args = vec!["--mode", mode, "--iface", &lab.server_if];
    args.extend_from_slice(&["--listen", &counter, "--listen", &tcp]);
    args.extend_from_slice(extra);
    Server::start_wrapped(Some(&lab.server_ns), wrapper, &args)
}

fn bypass_as_nobody(mode: &str, tag: &str) {
    let Some(lab) = LabNet::create(tag, 2) else {
        return;
    };
    let server = lab_server(&lab, mode, &[], &["--user", "nobody"]);
    serves_locked_down(&lab, server, 0, bypass_serves_the_lab);
}

/// A bypass server holding only `kept`, as nobody: it serves the lab (`load` returns the counter it
/// adds) and every endpoint exactly, stops cleanly and leaves no XDP program behind.
fn serves_locked_down(lab: &LabNet, server: Server, kept: u64, load: fn(&LabNet) -> u64) {
    assert!(lab.server_has_xdp());
    assert_locked_down(server.pid(), kept, NOBODY);
    let expected = load(lab) + every_endpoint_answers(&lab.server_ns, &server, NOBODY);
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(final_counter(&output), expected, "{output}");
    assert!(
        !lab.server_has_xdp(),
        "the XDP program stayed attached after exit"
    );
}

#[test]
fn afxdp_started_as_root_with_user_nobody_drops_everything_and_serves() {
    bypass_as_nobody("afxdp", "pa");
}

#[test]
fn xdp_started_as_root_with_user_nobody_drops_everything_and_serves() {
    bypass_as_nobody("xdp", "px");
}

/// The capabilities `deploy/ricochet.service` grants (AmbientCapabilities=).
fn unit_capabilities() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ricochet.service");
    let text = std::fs::read_to_string(unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit grants capabilities");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

#[test]
fn the_units_capabilities_start_afxdp_as_an_unprivileged_user() {
    if !require_tool("setpriv", "util-linux") {
        return;
    }
    let Some(lab) = LabNet::create("pu", 2) else {
        return;
    };
    // What systemd does for the unit: a non-root user with the unit's ambient capabilities.
    let caps: Vec<String> = unit_capabilities()
        .iter()
        .map(|c| format!("+{c}"))
        .collect();
    let caps = caps.join(",");
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps=-all,{caps}"),
        &format!("--ambient-caps=-all,{caps}"),
        &format!("--bounding-set=-all,{caps}"),
        "--",
    ];
    let server = lab_server(&lab, "afxdp", &wrapper, &["--mlock"]);
    serves_locked_down(&lab, server, CAP_IPC_LOCK, exactness_in_lab);
}

#[test]
fn mlock_keeps_cap_ipc_lock_and_nothing_else_in_every_thread() {
    if !require_root("a server started as root") {
        return;
    }
    let server = Server::start(&["--listen", "udp://127.0.0.1:0", "--mlock"]);
    assert_locked_down(server.pid(), CAP_IPC_LOCK, 0);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&frame(2), server.addr("counter+udp")).unwrap();
    let mut reply = [0u8; 64];
    let (n, _) = sock.recv_from(&mut reply).unwrap();
    assert_eq!(parse_reply(&reply[..n]), 2);
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
}

#[test]
fn user_must_exist_and_switching_needs_root() {
    let run = |wrapper: &[&str], args: &[&str]| {
        let mut argv: Vec<&str> = wrapper.to_vec();
        argv.extend_from_slice(&[
            BIN,
            "serve",
            "--listen",
            "udp://127.0.0.1:0",
            "--http",
            "off",
        ]);
        argv.extend_from_slice(args);
        let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (out.status.success(), stderr)
    };
    let (ok, err) = run(&[], &["--user", "no-such-user-ricochet"]);
    assert!(!ok && err.contains("no such user"), "{err}");
    if require_root("switching to nobody") && require_tool("setpriv", "util-linux") {
        let as_nobody = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ];
        let (ok, err) = run(&as_nobody, &["--user", "nobody"]);
        assert!(!ok && err.contains("needs root"), "{err}");
    }
}

#[test]
fn the_service_manager_hears_ready_then_stopping() {
    let path = temp_path("notify.sock");
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let env = format!("NOTIFY_SOCKET={}", path.display());
    let server = Server::start_wrapped(None, &["env", &env], &["--listen", "udp://127.0.0.1:0"]);
    // Server::start_wrapped returned after the ready line: READY=1 was sent before it.
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("READY=1 within 10 s");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    let n = socket.recv(&mut buf).expect("STOPPING=1 within 10 s");
    let stopping = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !require_tool("systemd-analyze", "systemd") {
        return;
    }
    // verify checks that ExecStart's binary exists: point it at the one under test.
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ricochet.service");
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/ricochet serve --config /etc/ricochet/ricochet.toml"));
    let dir = temp_path("unit");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("ricochet.service");
    std::fs::write(&copy, text.replace("/usr/bin/ricochet", BIN)).unwrap();
    assert_unit_verifies(&copy, None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unix_sockets_are_given_to_the_user_who_removes_them_at_exit() {
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;
    if !require_root("switching to nobody") {
        return;
    }
    // /tmp is sticky and world-writable: the owner of a file there may remove it.
    let path = format!("/tmp/ricochet-test-{}-user.sock", std::process::id());
    let spec = format!("unix://{path}");
    let server = Server::start(&["--listen", &spec, "--user", "nobody"]);
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), NOBODY);
    let mut conn = std::os::unix::net::UnixStream::connect(&path).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(&frame(4)).unwrap();
    let mut reply = [0u8; 16];
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(parse_reply(&reply), 4);
    drop(conn);
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert!(!Path::new(&path).exists(), "{path} was left behind");
}
