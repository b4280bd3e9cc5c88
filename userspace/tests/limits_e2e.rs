//! Resource limits end to end: a server out of file descriptors refuses connections (counted and
//! exported) instead of spinning on accept, and serves again once descriptors free up.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The server's open-file limit during the test: room for its own descriptors and a few dozen
/// connections, far fewer than the clients open.
const NOFILE: u64 = 64;
const CLIENTS_PER_PORT: usize = 150;

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

fn open_files(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Sets the process's open-file limit, soft and hard (lowering needs no privilege).
fn limit_open_files(pid: i32, n: u64) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:{n}")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit failed: {status}");
}

/// Connections waiting in the accept queues of the IPv4 TCP listeners on `port`
/// (/proc/net/tcp shows a listener's queue length as its rx_queue).
fn accept_backlog(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields[1].rsplit(':').next()?, 16).ok()?;
            let listening = fields[3] == "0A";
            let rx_queue = u64::from_str_radix(fields[4].split(':').nth(1)?, 16).ok()?;
            (listening && local_port == port).then_some(rx_queue)
        })
        .sum()
}

/// Whether the server ended this connection (EOF or reset) within `wait`.
fn was_refused(mut conn: &TcpStream, wait: Duration) -> bool {
    conn.set_read_timeout(Some(wait)).unwrap();
    let mut byte = [0u8; 1];
    match conn.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// The sum of a metric's samples whose lines contain every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn out_of_file_descriptors_connections_are_refused_without_spinning() {
    let server = Server::start(&["--listen", "tcp://127.0.0.1:0"]);
    let pid = server.pid();
    let tcp = server.addr("counter+tcp");
    let http: SocketAddr = server
        .spec("http+http://")
        .trim_start_matches("http+http://")
        .parse()
        .unwrap();
    let own = open_files(pid) as u64;
    assert!(
        own + 16 < NOFILE,
        "the server already holds {own} descriptors"
    );
    limit_open_files(pid, NOFILE);

    let mut clients: Vec<TcpStream> = Vec::with_capacity(2 * CLIENTS_PER_PORT);
    for addr in [tcp, http] {
        for _ in 0..CLIENTS_PER_PORT {
            clients.push(TcpStream::connect(addr).unwrap());
        }
    }
    // Hold them: a server spinning on EMFILE burns a core per thread meanwhile.
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(1000),
        "the server used {used:?} of CPU in 2 s while out of descriptors"
    );
    // The connections beyond the limit were refused (closed at once), not left to hang.
    let refused_seen = clients
        .iter()
        .filter(|c| was_refused(c, Duration::from_millis(20)))
        .count();
    // None is left waiting in a backlog: each was accepted (up to the limit) or refused.
    for addr in [tcp, http] {
        assert_eq!(
            accept_backlog(addr.port()),
            0,
            "connections hang in the backlog of {addr}"
        );
    }
    let capacity = (NOFILE - own) as usize;
    assert!(
        refused_seen + capacity + 2 >= 2 * CLIENTS_PER_PORT,
        "only {refused_seen} of {} connections were refused with room for about {capacity}",
        2 * CLIENTS_PER_PORT
    );

    // Closing them frees the server's descriptors: it answers again, and says what it refused.
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_files(pid) as u64 > own + 2 {
        assert!(Instant::now() < deadline, "the server kept its descriptors");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, metrics) = http_get(http, "/metrics");
    assert_eq!(status, 200);
    let kernel = metric(
        &metrics,
        "ricochet_conns_refused_total",
        &["datapath=\"kernel\""],
    );
    let http_refused = metric(&metrics, "ricochet_http_conns_refused_total", &[]);
    assert!(kernel > 0, "no kernel refusal counted:\n{metrics}");
    assert!(http_refused > 0, "no HTTP refusal counted");
    assert_eq!(
        kernel + http_refused,
        refused_seen as u64,
        "refusals counted by the server and seen by the clients differ"
    );
    let (_, stats) = http_get(http, "/stats");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["http"]["http_conns_refused"], http_refused);

    let mut conn = TcpStream::connect(tcp).unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    conn.write_all(&frame(5)).unwrap();
    let mut reply = [0u8; 16];
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(parse_reply(&reply), 5);
    drop(conn);

    let (ok, output) = server.terminate();
    assert!(ok);
    assert_eq!(total_field(&output, "conns_refused"), kernel);
}
