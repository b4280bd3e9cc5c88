//! Test helpers: run `ricochet serve` as a child process, read the addresses it bound, stop it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ricochet::wire::CounterRepr;

pub const BIN: &str = env!("CARGO_BIN_EXE_ricochet");

/// A running server; killed when dropped so a failing test leaves nothing behind.
pub struct Server {
    child: Option<Child>,
    pub listening: Vec<String>,
    stdout: Option<BufReader<std::process::ChildStdout>>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
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

    /// Sends SIGTERM and returns (exit success, everything printed after start-up).
    pub fn terminate(mut self) -> (bool, String) {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
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

/// Skips (with a printed reason) when a tool is missing, unless the run requires every tool
/// (`cargo xtask test` and CI set RICOCHET_REQUIRE_TOOLS=1), where a missing tool fails the test.
pub fn require_tool(tool: &str, package: &str) -> bool {
    if have(tool) {
        return true;
    }
    if std::env::var_os("RICOCHET_REQUIRE_TOOLS").is_some() {
        panic!("{tool} is required (RICOCHET_REQUIRE_TOOLS is set): apt-get install {package}");
    }
    eprintln!(
        "SKIP: {tool} not installed (apt-get install {package}; cargo xtask test installs it)"
    );
    false
}
