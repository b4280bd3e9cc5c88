//! `serve --state-dir`: the counter survives SIGKILL under load exactly (kernel path on loopback,
//! afxdp and xdp in the lab), a machine crash up to the last snapshot (the live record lost, the
//! newest snapshot torn), and SIGTERM with a clean final snapshot.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use ricochet::durable::Snapshot;

/// A UDP port free right now on loopback (the server binds it again after each restart).
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &Path, port: u16) -> Server {
    let listen = format!("udp://127.0.0.1:{port}");
    Server::start(&[
        "--listen",
        &listen,
        "--state-dir",
        dir.to_str().unwrap(),
        "--sync-interval",
        "20ms",
    ])
}

/// One request: the reply's value, or None after 300 ms.
fn ask(socket: &UdpSocket, increment: u64) -> Option<u64> {
    socket.send(&frame(increment)).ok()?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).ok()?;
    Some(parse_reply(&buf[..n]))
}

fn client(addr: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    socket
}

/// What clients saw: answered (increment, value) pairs, and the increments never answered.
#[derive(Default)]
struct Seen {
    answered: Vec<(u64, u64)>,
    unanswered: Vec<u64>,
}

/// Four clients sending non-zero increments until `stop`.
fn load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..4u64)
        .map(|c| {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let socket = client(addr);
                let mut rng = Rng::new(77 + c);
                while !stop.load(Ordering::Relaxed) {
                    let increment = 1 + rng.below(100);
                    let reply = ask(&socket, increment);
                    let mut seen = seen.lock().unwrap();
                    match reply {
                        Some(value) => seen.answered.push((increment, value)),
                        None => seen.unanswered.push(increment),
                    }
                }
            })
        })
        .collect()
}

fn live_value(dir: &Path) -> u64 {
    let bytes = std::fs::read(dir.join("counter.live")).unwrap();
    u64::from_ne_bytes(bytes[..8].try_into().unwrap())
}

/// Runs load for `seconds`, killing the server with `signal` half way.
fn load_then(server: Server, addr: SocketAddr, signal: Signal) -> (Seen, bool, String) {
    let (stop, seen) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Seen::default())),
    );
    let clients = load(addr, stop.clone(), seen.clone());
    std::thread::sleep(Duration::from_millis(700));
    let (ok, output) = server.signal(signal);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().unwrap());
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (seen, ok, output)
}

#[test]
fn kernel_path_counter_survives_sigkill_under_load_exactly_and_sigterm_cleanly() {
    let dir = temp_path("state-kernel");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (first, _, output) = load_then(start(&dir, port), addr, Signal::SIGKILL);
    assert!(
        first.answered.len() > 100,
        "too little load: {}",
        first.answered.len()
    );
    // What the dead process left: every answered increment, and perhaps some it never answered.
    let dead = live_value(&dir);
    let answered: u64 = first.answered.iter().map(|&(inc, _)| inc).sum();
    let unanswered: u64 = first.unanswered.iter().sum();
    assert!(
        dead >= answered && dead <= answered + unanswered,
        "{dead} vs {answered}+{unanswered}:\n{output}"
    );
    let mut values: Vec<u64> = first.answered.iter().map(|&(_, v)| v).collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(
        values.len(),
        first.answered.len(),
        "a value was handed out twice"
    );

    // The restart resumes exactly there, and every later reply is beyond it.
    let server = start(&dir, port);
    assert_eq!(
        ask(&client(addr), 0),
        Some(dead),
        "the counter did not resume where it died"
    );
    let (second, ok, output) = load_then(server, addr, Signal::SIGTERM);
    assert!(ok, "{output}");
    assert!(second.answered.iter().all(|&(_, v)| v > dead));
    let final_counter = final_counter(&output);
    let added: u64 = second.answered.iter().map(|&(inc, _)| inc).sum();
    let lost: u64 = second.unanswered.iter().sum();
    assert!(final_counter >= dead + added && final_counter <= dead + added + lost);

    // SIGTERM synced it: the next start says so and resumes at the final value.
    let server = start(&dir, port);
    assert_eq!(ask(&client(addr), 0), Some(final_counter));
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The two snapshot slots as they are on disk.
fn slots(dir: &Path) -> [Option<Snapshot>; 2] {
    let bytes = std::fs::read(dir.join("counter.snap")).unwrap();
    [
        Snapshot::decode(&bytes[0..]),
        Snapshot::decode(&bytes[4096..]),
    ]
}

#[test]
fn a_machine_crash_resumes_from_the_newest_whole_snapshot() {
    let dir = temp_path("state-crash");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = start(&dir, port);
    let socket = client(addr);
    let mut value = 0;
    for _ in 0..3 {
        value = ask(&socket, 10).unwrap();
        // Longer than --sync-interval: each value gets its own snapshot.
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, _) = server.signal(Signal::SIGKILL);
    // A power loss: the page cache never reached the disk, so the live file is lost.
    std::fs::write(dir.join("counter.live"), [0u8; 8]).unwrap();
    let [a, b] = slots(&dir);
    let (newest, older) = if a.unwrap().seq > b.unwrap().seq {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(
        newest.unwrap().value,
        value,
        "the last snapshot holds the last value"
    );
    let server = start(&dir, port);
    assert_eq!(
        ask(&client(addr), 0),
        Some(value),
        "at most --sync-interval may be lost"
    );
    let (_, _) = server.signal(Signal::SIGKILL);

    // And if the newest snapshot was torn by the crash, the older one still stands.
    std::fs::write(dir.join("counter.live"), [0u8; 8]).unwrap();
    let [a, b] = slots(&dir);
    let newest_offset = if a.unwrap().seq > b.unwrap().seq {
        0
    } else {
        4096
    };
    let older = if newest_offset == 0 { b } else { a }.unwrap_or_else(|| older.unwrap());
    let mut bytes = std::fs::read(dir.join("counter.snap")).unwrap();
    bytes[newest_offset + 30] ^= 0xff;
    std::fs::write(dir.join("counter.snap"), &bytes).unwrap();
    let server = start(&dir, port);
    assert_eq!(ask(&client(addr), 0), Some(older.value));
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_instance_on_the_same_state_directory_is_refused() {
    let dir = temp_path("state-twice");
    let server = start(&dir, free_port());
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "udp://127.0.0.1:0",
            "--http",
            "off",
            "--state-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("another ricochet holds the state directory"),
        "{stderr}"
    );
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bpffs mounted on the host for the test (a pin made under `ip netns exec`, which remounts /sys,
/// must live in a bpffs that outlives the process); unmounted on drop, also when the test fails.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(tag: &str) -> Bpffs {
        let dir = PathBuf::from(format!(
            "/run/ricochet-test-{}-{tag}-bpffs",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot mount a bpffs on {}",
            dir.display()
        );
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The live value a killed bypass server left: the file (afxdp) or the pinned map (xdp).
fn bypass_live_value(mode: &str, dir: &Path, bpffs: &Bpffs) -> u64 {
    if mode == "xdp" {
        let pin = ricochet::durable::pin_path(&bpffs.0, &dir.canonicalize().unwrap());
        ricochet::xdp::read_pinned_counter(&pin)
            .unwrap()
            .expect("a pinned counter")
    } else {
        live_value(dir)
    }
}

fn bypass_server(lab: &LabNet, mode: &str, dir: &Path, bpffs: &Bpffs) -> Server {
    let listen = format!("udp://{LAB_SERVER}:{COUNTER_PORT}");
    let args = [
        "--mode",
        mode,
        "--iface",
        &lab.server_if,
        "--listen",
        &listen,
        "--state-dir",
        dir.to_str().unwrap(),
        "--bpffs",
        bpffs.0.to_str().unwrap(),
    ];
    Server::start_in(Some(&lab.server_ns), &args)
}

/// The counter read from the lab client (increment 0).
fn read_in_lab(lab: &LabNet) -> u64 {
    let r = bench_json_in(
        lab,
        &[
            &format!("udp://{LAB_SERVER}:{COUNTER_PORT}"),
            "--requests",
            "1",
            "--increment",
            "0",
        ],
    );
    r["last_counter_value"]
        .as_u64()
        .unwrap_or_else(|| panic!("no last_counter_value in {r}"))
}

fn bypass_survives_sigkill_under_load(mode: &str, tag: &str) {
    let Some(lab) = LabNet::create(tag, 2) else {
        return;
    };
    let dir: PathBuf = temp_path(&format!("state-{mode}"));
    let bpffs = Bpffs::mount(tag);
    let server = bypass_server(&lab, mode, &dir, &bpffs);
    let spec = format!("udp://{LAB_SERVER}:{COUNTER_PORT}");
    let load = {
        let (ns, spec) = (lab.client_ns.clone(), spec.clone());
        std::thread::spawn(move || {
            let args = [
                "netns",
                "exec",
                &ns,
                BIN,
                "bench",
                &spec,
                "-c",
                "8",
                "--duration",
                "2s",
                "--timeout",
                "300ms",
                "--json",
            ];
            std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    let (_, _) = server.signal(Signal::SIGKILL);
    load.join().unwrap();
    let dead = bypass_live_value(mode, &dir, &bpffs);
    assert!(dead > 0, "no load reached the server");
    let server = bypass_server(&lab, mode, &dir, &bpffs);
    assert_eq!(
        read_in_lab(&lab),
        dead,
        "{mode}: the counter did not resume where it died"
    );
    let r = bench_json_in(
        &lab,
        &[
            &spec,
            "--requests",
            "2000",
            "--increment",
            "3",
            "--timeout",
            "2s",
        ],
    );
    assert_eq!(r["received"], 2000);
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(final_counter(&output), dead + 6000);
    // The live record outlives the process too: the final value is there for the next start.
    assert_eq!(bypass_live_value(mode, &dir, &bpffs), dead + 6000);
    // The per-second history holds every increment too, across the SIGKILL, and the second run's
    // requests (in xdp mode those the program answered in the kernel).
    assert!(dir.join(ricochet::history::FILE).exists());
    let history = ricochet::history::History::open(&dir).unwrap();
    let (totals, _) = history.summary(0, i64::MAX, false).unwrap();
    assert_eq!(
        totals.increments,
        u128::from(dead + 6000),
        "{mode}: the history"
    );
    assert!(totals.requests > 2000, "{mode}: {totals:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn afxdp_counter_survives_sigkill_under_load() {
    bypass_survives_sigkill_under_load("afxdp", "da");
}

#[test]
fn xdp_counter_survives_sigkill_under_load() {
    bypass_survives_sigkill_under_load("xdp", "dx");
}
