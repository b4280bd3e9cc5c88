//! A real PostgreSQL server for one test: Debian's `postgresql` binaries, a cluster initialised in
//! a temporary directory as the `postgres` user, listening on a loopback port and a socket in that
//! directory. Stopped (immediately) and removed when dropped, so a failing test leaves nothing.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{require_root, skip};

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

/// The newest installed server's bin directory (/usr/lib/postgresql/N/bin).
fn server_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A free port below the kernel's ephemeral range (32768 and up), so that a cluster stopped for a
/// while cannot see its port handed to someone else's `bind(0)` and come back to find it taken.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 600) as u16 * 20;
    for _ in 0..2000 {
        let port = 20_000 + (base - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port for PostgreSQL between 20000 and 32000");
}

impl Postgres {
    /// Starts a fresh cluster; None (a skip, or a failure under CI) without root or PostgreSQL.
    pub fn start(tag: &str) -> Option<Postgres> {
        if !require_root("a PostgreSQL cluster run as the postgres user") {
            return None;
        }
        let Some(bin) = server_bin() else {
            skip("PostgreSQL is not installed (apt-get install postgresql; cargo xtask test installs it)");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("ricochet-pg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pg = Postgres {
            dir,
            bin,
            port: free_port(),
        };
        run_as_postgres(
            &["chown", "-R", "postgres", pg.dir.to_str().unwrap()],
            false,
        );
        let data = pg.data();
        pg.tool(&[
            "initdb",
            "-D",
            &data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        pg.start_again();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn tool(&self, args: &[&str]) {
        let program = self.bin.join(args[0]).display().to_string();
        let mut argv = vec![program.as_str()];
        argv.extend_from_slice(&args[1..]);
        run_as_postgres(&argv, true);
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.dir.display(),
            self.port
        );
        let log = self.dir.join("log").display().to_string();
        self.tool(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-o",
            &options,
            "-l",
            &log,
            "-w",
            "-t",
            "30",
            "start",
        ]);
    }

    /// Stops the server at once, as a crash would (no checkpoint).
    pub fn crash(&self) {
        self.tool(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
    }

    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls)
            .expect("connect to the test PostgreSQL")
    }
}

/// Runs a command as the postgres user (or as root when `as_postgres` is false).
fn run_as_postgres(argv: &[&str], as_postgres: bool) {
    let mut command = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).args(argv);
        c
    } else {
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..]);
        c
    };
    let out = command
        .stdin(Stdio::null())
        .output()
        .expect("run a PostgreSQL tool");
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Not `crash()`: a drop during a failing test must not panic again.
        let program = self.bin.join("pg_ctl").display().to_string();
        let data = self.data();
        let argv = [
            program.as_str(),
            "-D",
            &data,
            "-m",
            "immediate",
            "-w",
            "stop",
        ];
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(argv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
