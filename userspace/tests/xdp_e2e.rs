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

    let expected = bypass_serves_the_lab(&lab);

    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(
        final_counter(&output),
        expected,
        "one counter for XDP_TX and the kernel path"
    );
    // 16 lab clients x 300 requests, the bench's 20,000, and two reads each in the invalid-request
    // and the port-zero checks.
    assert_eq!(xdp_field(&output, "tx"), 16 * 300 + 20000 + 4);
    assert_eq!(xdp_field(&output, "drop_bad_hash"), 3);
    assert_eq!(xdp_field(&output, "drop_wrong_length"), 2);
    assert_eq!(
        xdp_field(&output, "drop_zero_source_port"),
        1,
        "the datagram from port 0 is dropped in the program"
    );
    assert_eq!(total_field(&output, "drop_zero_source_port"), 1);
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
