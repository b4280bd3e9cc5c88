//! End-to-end tests of the AF_XDP datapath in a fresh pair of network namespaces joined by a veth pair
//! with two queues, created and removed by each test: exactness over both queues and the kernel
//! fallback, invalid requests, host traffic while attached, sockperf, and no program left behind.

mod common;

use std::process::Command;

use std::time::Duration;

use common::*;

const SOCKPERF_PORT: u16 = 11111;

fn start(lab: &LabNet, xdp_mode: &str, extra: &[&str]) -> Server {
    let counter = format!("udp://{LAB_SERVER}:{COUNTER_PORT}");
    let tcp = format!("tcp://{LAB_SERVER}:{COUNTER_PORT}");
    let sockperf = format!("sockperf+udp://{LAB_SERVER}:{SOCKPERF_PORT}");
    let mut args = vec![
        "--mode",
        "afxdp",
        "--iface",
        &lab.server_if,
        "--xdp-mode",
        xdp_mode,
        "--listen",
        &counter,
        "--listen",
        &tcp,
        "--listen",
        &sockperf,
    ];
    args.extend_from_slice(extra);
    Server::start_in(Some(&lab.server_ns), &args)
}

/// `key=value` of the `afxdp queue=N` line.
fn queue_field(output: &str, queue: u32, key: &str) -> u64 {
    let line = output
        .lines()
        .find(|l| l.starts_with(&format!("afxdp queue={queue} ")))
        .unwrap_or_else(|| panic!("no afxdp queue={queue} line in:\n{output}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn afxdp_native_mode_end_to_end() {
    let Some(lab) = LabNet::create("n", 2) else {
        return;
    };
    let server = start(&lab, "native", &[]);
    assert!(lab.server_has_xdp());

    let expected = bypass_serves_the_lab(&lab);
    if require_tool("sockperf", "sockperf") {
        let port = SOCKPERF_PORT.to_string();
        let (ok, out) = lab.client_cmd(
            "sockperf",
            &["ping-pong", "-i", LAB_SERVER, "-p", &port, "-t", "2"],
        );
        assert!(ok, "{out}");
        assert!(out.contains("# dropped messages = 0;"), "{out}");
    }

    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(
        final_counter(&output),
        expected,
        "one counter across the AF_XDP and kernel paths"
    );
    for queue in 0..2 {
        assert!(
            queue_field(&output, queue, "requests") > 0,
            "queue {queue} carried no traffic:\n{output}"
        );
        assert!(
            queue_field(&output, queue, "replies") > 0,
            "queue {queue} answered nothing:\n{output}"
        );
    }
    assert!(
        output.contains("drop_bad_hash=3"),
        "the three bad-hash frames reached userspace and were dropped:\n{output}"
    );
    assert_eq!(
        total_field(&output, "drop_zero_source_port"),
        1,
        "the datagram from port 0 was dropped and counted once:\n{output}"
    );
    assert!(
        !lab.server_has_xdp(),
        "the XDP program must be gone after SIGTERM"
    );
}

#[test]
fn afxdp_generic_mode_and_sigkill_leave_nothing() {
    let Some(lab) = LabNet::create("g", 2) else {
        return;
    };
    let server = start(
        &lab,
        "generic",
        &["--poll", "block", "--cpus", "1", "--sched-fifo", "10"],
    );
    assert!(lab.server_has_xdp());
    // The AF_XDP workers own --cpus and run under SCHED_FIFO; the kernel fallback runs on the
    // housekeeping CPU (0) under the normal policy, so it can never preempt them.
    for (name, cpus, policy) in [
        ("afxdp-q0", "1", 1),
        ("afxdp-q1", "1", 1),
        ("kernel-0", "0", 0),
    ] {
        let (allowed, actual_policy) = thread_placement(server.pid(), name);
        assert_eq!(
            (allowed.as_str(), actual_policy),
            (cpus, policy),
            "thread {name}"
        );
    }
    let sum = exactness_in_lab(&lab);
    assert!(sum > 0);
    // Blocking workers sleep 100 ms a turn; their XDP_STATISTICS still refresh on a wall-clock
    // deadline, so /metrics is never more than a few hundred milliseconds old.
    std::thread::sleep(Duration::from_millis(1500));
    let metrics = http_get_in(&lab.server_ns, &server, "/metrics");
    for queue in 0..2 {
        let age = metric_value(
            &metrics,
            &format!("ricochet_xsk_stats_age_seconds{{queue=\"{queue}\"}}"),
        )
        .unwrap_or_else(|| panic!("no statistics age for queue {queue}:\n{metrics}"));
        assert!(age < 1.0, "queue {queue}: XDP_STATISTICS are {age} s old");
    }
    let response = http_get_in(&lab.server_ns, &server, "/stats");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let stats: serde_json::Value = serde_json::from_str(body).unwrap();
    every_bypass_statistic_is_in_metrics_and_stats(&metrics, &stats);
    // Generic mode was asked for, so it is no fallback; copy mode on veth is one.
    assert_eq!(stats["started_as"]["xdp_mode"], "generic", "{stats}");
    assert_eq!(stats["started_as"]["zero_copy"], false, "{stats}");
    assert_eq!(
        stats["started_as"]["fallbacks"],
        serde_json::json!(["zero-copy -> copy mode"]),
        "{stats}"
    );
    // SIGKILL: no chance to clean up; the BPF link dies with the process.
    let _ = server.signal(nix::sys::signal::Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !lab.server_has_xdp(),
        "the XDP program must be gone after SIGKILL"
    );
}

/// Every field of the AF_XDP socket record (per queue) and every XDP program counter is in both
/// /metrics and /stats: both views render the same field lists.
fn every_bypass_statistic_is_in_metrics_and_stats(metrics: &str, stats: &serde_json::Value) {
    let afxdp: Vec<&serde_json::Value> = stats["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["datapath"] == "afxdp")
        .collect();
    assert!(!afxdp.is_empty(), "no afxdp worker in /stats: {stats}");
    for field in ricochet::stats::XskStats::default().fields() {
        for w in &afxdp {
            let queue = &w["id"];
            let sample = format!("ricochet_xsk_{}_total{{queue=\"{queue}\"}}", field.name);
            assert!(
                metric_value(metrics, &sample).is_some(),
                "{sample} is not in /metrics"
            );
            assert!(
                w["xsk"][field.name].is_u64(),
                "xsk {} is not in /stats: {w}",
                field.name
            );
        }
    }
    for stat in ricochet::xdp::maps::XdpStat::ALL {
        let name = stat.as_str();
        let sample = format!("ricochet_xdp_program_total{{counter=\"{name}\"}}");
        assert!(
            metric_value(metrics, &sample).is_some(),
            "{sample} is not in /metrics"
        );
        assert!(stats["xdp"][name].is_u64(), "xdp {name} is not in /stats");
    }
}

/// GET `path` from the server's HTTP endpoint (on loopback inside namespace `ns`); returns the
/// whole response, head and body.
fn http_get_in(ns: &str, server: &Server, path: &str) -> String {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = server
        .spec("http+http://")
        .trim_start_matches("http+http://")
        .parse()
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    in_netns(ns, move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response
    })
    .join()
    .unwrap()
}

/// The value of the first exposition line that starts with `series` (name and labels).
fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|rest| rest.trim().parse().ok())
}

/// The CPUs a thread of `pid` named `name` may run on and its scheduling policy (0 normal, 1 FIFO).
fn thread_placement(pid: i32, name: &str) -> (String, u32) {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        if std::fs::read_to_string(dir.join("comm")).unwrap().trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        // /proc/PID/task/TID/stat: field 41 is the policy; the command name (field 2) has no spaces here.
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let policy = stat.split_whitespace().nth(40).unwrap().parse().unwrap();
        return (allowed, policy);
    }
    panic!("no thread named {name} in process {pid}");
}

fn serve_fails_in(lab: &LabNet, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.server_ns, BIN, "serve"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn afxdp_start_up_errors_and_force() {
    let Some(lab) = LabNet::create("e", 1) else {
        return;
    };
    let listen = format!("udp://{LAB_SERVER}:{COUNTER_PORT}");
    let err = serve_fails_in(
        &lab,
        &["--mode", "afxdp", "--iface", "nope0", "--listen", &listen],
    );
    assert!(err.contains("no interface named 'nope0'"), "{err}");
    let err = serve_fails_in(
        &lab,
        &[
            "--mode",
            "afxdp",
            "--iface",
            &lab.server_if,
            "--listen",
            "udp://127.0.0.1:7777",
        ],
    );
    assert!(err.contains("is not an address of"), "{err}");
    let err = serve_fails_in(&lab, &["--mode", "afxdp", "--listen", &listen]);
    assert!(err.contains("needs --iface"), "{err}");
    let err = serve_fails_in(
        &lab,
        &[
            "--mode",
            "afxdp",
            "--iface",
            &lab.server_if,
            "--listen",
            &listen,
            "--queues",
            "5",
        ],
    );
    assert!(err.contains("queue 5 does not exist"), "{err}");

    // Someone else's XDP program: refused without --force, replaced with it.
    let object = concat!(env!("OUT_DIR"), "/ricochet.bpf.o");
    let status = Command::new("ip")
        .args([
            "-n",
            &lab.server_ns,
            "link",
            "set",
            "dev",
            &lab.server_if,
            "xdpgeneric",
            "obj",
            object,
            "sec",
            "xdp",
        ])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "ip could not attach a foreign XDP program"
    );
    // The kernel workers are already running when the attachment is refused: the failed start-up
    // stops and joins them, so their Unix socket file is removed, not left behind.
    let socket = std::env::temp_dir().join(format!("ricochet-afxdp-{}.sock", std::process::id()));
    let unix = format!("unix://{}", socket.display());
    let err = serve_fails_in(
        &lab,
        &[
            "--mode",
            "afxdp",
            "--iface",
            &lab.server_if,
            "--listen",
            &listen,
            "--listen",
            &unix,
            "--xdp-mode",
            "generic",
        ],
    );
    assert!(err.contains("another XDP program is attached"), "{err}");
    assert!(
        !socket.exists(),
        "a failed start-up left {} behind",
        socket.display()
    );
    let server = Server::start_in(
        Some(&lab.server_ns),
        &[
            "--mode",
            "afxdp",
            "--iface",
            &lab.server_if,
            "--listen",
            &listen,
            "--xdp-mode",
            "generic",
            "--force",
        ],
    );
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert!(!lab.server_has_xdp());
}
