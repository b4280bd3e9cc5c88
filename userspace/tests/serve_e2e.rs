//! `ricochet serve` as an operator meets it: signals handled on purpose (SIGHUP reports and keeps
//! serving, SIGQUIT stops gracefully), start-up refusals for unusable settings, and datagrams that
//! can never be answered (source port 0) dropped and counted on the kernel path.

mod common;

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::process::Command;

use common::*;
use nix::sys::signal::Signal;

#[test]
fn sighup_reports_and_keeps_serving_sigquit_stops_gracefully() {
    let sock = temp_path("signals.sock");
    let unix = format!("unix://{}", sock.display());
    let mut server = Server::start(&["--listen", "udp://127.0.0.1:0", "--listen", &unix]);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.connect(server.addr("counter+udp")).unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let ask = |increment: u64| {
        let mut buf = [0u8; 64];
        udp.send(&frame(increment)).unwrap();
        let n = udp.recv(&mut buf).unwrap();
        parse_reply(&buf[..n])
    };
    assert_eq!(ask(5), 5);

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid()), Signal::SIGHUP).unwrap();
    let status = server.read_until("status total ");
    assert!(status.contains("status counter=5"), "{status}");
    // Still alive and serving, on every listener.
    assert_eq!(ask(2), 7);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&frame(1)).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(parse_reply(&reply), 8);
    drop(s);

    let (ok, output) = server.signal(Signal::SIGQUIT);
    assert!(ok, "SIGQUIT is a graceful stop with exit 0:\n{output}");
    assert_eq!(final_counter(&output), 8);
    assert!(!sock.exists(), "the Unix socket file is removed on SIGQUIT");
}

fn serve_output(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), stderr)
}

#[test]
fn an_empty_http_token_is_refused_at_start_up() {
    for http in ["0.0.0.0:0", "127.0.0.1:0"] {
        let args = ["--listen", "udp://127.0.0.1:0", "--http", http];
        let (ok, err) = serve_output(&[&args[..], &["--http-token", ""]].concat(), &[]);
        assert!(!ok && err.contains("is empty"), "{http}: {err}");
        let (ok, err) = serve_output(&args, &[("RICOCHET_HTTP_TOKEN", "")]);
        assert!(
            !ok && err.contains("is empty"),
            "{http} from the environment: {err}"
        );
    }
}

#[test]
fn kernel_path_drops_and_counts_source_port_zero() {
    if !require_root("sending from UDP source port 0 (a raw socket)") {
        return;
    }
    let server = Server::start(&["--listen", "udp://127.0.0.1:0", "--cpus", "0"]);
    let addr = server.addr("counter+udp");
    send_from_port_zero(addr, &frame(9));
    // A read afterwards from an ordinary socket: the counter did not move.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.connect(addr).unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    udp.send(&frame(0)).unwrap();
    let mut buf = [0u8; 64];
    let n = udp.recv(&mut buf).unwrap();
    assert_eq!(parse_reply(&buf[..n]), 0);
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(total_field(&output, "drop_zero_source_port"), 1, "{output}");
    assert_eq!(total_field(&output, "tx_errors"), 0, "{output}");
    assert_eq!(total_field(&output, "replies"), 1, "{output}");
}

#[test]
fn extreme_durations_are_refused_with_the_flag_named() {
    for (flag, value) in [
        ("--http-idle-timeout", "10000000000000000000s"),
        ("--http-idle-timeout", "0s"),
        ("--http-header-timeout", "18446744073709551615s"),
        ("--http-header-timeout", "1e300s"),
        ("--http-max-pending", "1"),
    ] {
        let (ok, err) = serve_output(&["--listen", "udp://127.0.0.1:0", flag, value], &[]);
        assert!(!ok, "{flag} {value} was accepted");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}
