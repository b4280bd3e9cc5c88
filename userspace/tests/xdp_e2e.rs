//! End-to-end tests of the in-kernel XDP responder (`--mode xdp`) in a fresh pair of namespaces: one
//! exact counter shared by XDP_TX replies and the kernel-socket fallback, invalid requests never
//! answered, host traffic unaffected, nothing attached after SIGTERM or SIGKILL.

mod common;

use common::*;

fn start(lab: &LabNet, xdp_mode: &str) -> Server {
    let counter = format!("udp://{LAB_SERVER}:{COUNTER_PORT}");
    let tcp = format!("tcp://{LAB_SERVER}:{COUNTER_PORT}");
    Server::start_in(
        Some(&lab.server_ns),
        &[
            "--mode",
            "xdp",
            "--iface",
            &lab.server_if,
            "--xdp-mode",
            xdp_mode,
            "--listen",
            &counter,
            "--listen",
            &tcp,
        ],
    )
}

/// `key=value` of the `xdp` statistics line.
fn xdp_field(output: &str, key: &str) -> u64 {
    let line = output
        .lines()
        .find(|l| l.starts_with("xdp "))
        .unwrap_or_else(|| panic!("no xdp line in:\n{output}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

#[test]
fn xdp_mode_end_to_end() {
    let Some(lab) = LabNet::create("x", 2) else {
        return;
    };
    let server = start(&lab, "native");
    assert!(lab.server_has_xdp());

    // Lab clients answered in the kernel and loopback clients in the responder namespace answered by
    // the kernel-socket path, at the same time, on one counter.
    let sum = exactness_in_lab(&lab);
    invalid_requests_are_never_answered(&lab);

    let spec = format!("udp://{LAB_SERVER}:{COUNTER_PORT}");
    let r = bench_json_in(
        &lab,
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

    let tcp = format!("tcp://{LAB_SERVER}:{COUNTER_PORT}");
    let t = bench_json_in(&lab, &[&tcp, "--requests", "100"]);
    assert_eq!(t["received"], 100);
    if require_tool("ping", "iputils-ping") {
        let (ok, out) = lab.client_cmd("ping", &["-c", "2", "-W", "2", LAB_SERVER]);
        assert!(ok, "ping to the responder failed while attached: {out}");
    }

    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(
        final_counter(&output),
        sum + 3 * 20000 + 100,
        "one counter for XDP_TX and the kernel path"
    );
    // 16 lab clients x 300 requests, the bench's 20,000 and the invalid-request check's two reads.
    assert_eq!(xdp_field(&output, "tx"), 16 * 300 + 20000 + 2);
    assert_eq!(xdp_field(&output, "drop_bad_hash"), 3);
    assert_eq!(xdp_field(&output, "drop_wrong_length"), 2);
    assert_eq!(
        total_field(&output, "drop_bad_hash"),
        3,
        "XDP drops merge into the totals"
    );
    assert!(
        !lab.server_has_xdp(),
        "the XDP program must be gone after SIGTERM"
    );
}

#[test]
fn xdp_generic_mode_and_sigkill_leave_nothing() {
    let Some(lab) = LabNet::create("y", 1) else {
        return;
    };
    let server = start(&lab, "generic");
    assert!(lab.server_has_xdp());
    let spec = format!("udp://{LAB_SERVER}:{COUNTER_PORT}");
    let r = bench_json_in(
        &lab,
        &[
            &spec,
            "-c",
            "8",
            "-d",
            "2",
            "--requests",
            "4000",
            "--timeout",
            "2s",
        ],
    );
    assert_eq!(
        (
            r["received"].as_u64(),
            r["lost"].as_u64(),
            r["duplicate_values"].as_u64()
        ),
        (Some(4000), Some(0), Some(0))
    );
    assert_eq!(r["last_counter_value"], 4000);
    let _ = server.signal(nix::sys::signal::Signal::SIGKILL);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !lab.server_has_xdp(),
        "the XDP program must be gone after SIGKILL"
    );
}
