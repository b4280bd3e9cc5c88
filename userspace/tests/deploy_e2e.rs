//! deploy/fleet, end to end: nginx load-balancing two ricochet instances' HTTP endpoints over
//! their Unix sockets (the instances read deploy/fleet/a.toml and b.toml, with paths and ports of
//! this test given as flags over them), both shipping to one real PostgreSQL. Increments arrive
//! through nginx and over UDP; PostgreSQL stops for a while; one instance is SIGKILLed and
//! restarted. Then the fleet summary, each /summary and each counter agree exactly.

mod common;

use std::net::{TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/fleet")
        .join(file)
}

fn unix_json(socket: &Path, path: &str) -> Value {
    let stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (status, body) = http_exchange(stream, "GET", path, "");
    assert_eq!(status, 200, "GET {path} on {}: {body}", socket.display());
    serde_json::from_str(&body).unwrap()
}

/// One instance of the example: its configuration file, with this test's paths and ports as flags.
struct Instance {
    name: &'static str,
    port: u16,
    socket: PathBuf,
    state: PathBuf,
}

impl Instance {
    fn new(name: &'static str, dir: &Path) -> Instance {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Instance {
            name,
            port,
            socket: dir.join(format!("{name}.sock")),
            state: dir.join(format!("state-{name}")),
        }
    }

    fn start(&self, pg: &Postgres) -> Server {
        let config = deploy(&format!("{}.toml", self.name));
        let listen = format!("udp://127.0.0.1:{}", self.port);
        let http = format!("unix://{}", self.socket.display());
        Server::start(&[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &listen,
            "--http",
            &http,
            // nginx's workers run as nobody here, not www-data.
            "--http-socket-group",
            "nogroup",
            "--state-dir",
            self.state.to_str().unwrap(),
            "--fleet",
            &pg.url(),
            "--fleet-interval",
            "200ms",
        ])
    }

    fn json(&self, path: &str) -> Value {
        unix_json(&self.socket, path)
    }

    fn counter(&self) -> u64 {
        self.json("/counter")["value"].as_u64().unwrap()
    }

    /// Sends `n` UDP counter requests of increment `inc`; returns their sum.
    fn udp(&self, n: u64, inc: u64) -> u64 {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(("127.0.0.1", self.port)).unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..n {
            socket.send(&frame(inc)).unwrap();
            assert_eq!(socket.recv(&mut buf).expect("a UDP reply"), 16);
        }
        n * inc
    }
}

/// nginx with deploy/fleet/nginx.conf, its socket paths and port replaced by this test's.
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn start(dir: &Path, a: &Instance, b: &Instance) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let site = std::fs::read_to_string(deploy("nginx.conf")).unwrap();
        assert!(site.contains("unix:/run/ricochet/a/http.sock") && site.contains("127.0.0.1:8080"));
        let site = site
            .replace("/run/ricochet/a/http.sock", a.socket.to_str().unwrap())
            .replace("/run/ricochet/b/http.sock", b.socket.to_str().unwrap())
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        std::fs::write(dir.join("site.conf"), site).unwrap();
        let d = dir.display();
        let main = format!(
            "pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  include {d}/site.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let child = Command::new("nginx")
            .args([
                "-c",
                dir.join("nginx.conf").to_str().unwrap(),
                "-g",
                "daemon off;",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The guard first: a failed start still stops what did start.
        let nginx = Nginx { child, port };
        let deadline = Instant::now() + TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: see {d}/nginx-error.log"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    /// POST /counter {"increment": n} through nginx; returns which instance's value answered.
    fn post(&self, n: u64) -> u64 {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let (status, body) = http_exchange(
            stream,
            "POST",
            "/counter",
            &format!("{{\"increment\": {n}}}"),
        );
        assert_eq!(status, 200, "{body}");
        n
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its workers (SIGKILL would orphan them).
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fleet_summary(pg: &Postgres) -> Value {
    let out = Command::new(BIN)
        .args(["fleet", "summary", "--json", "--fleet", &pg.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn waiting(instance: &Instance) -> u64 {
    instance.json("/stats")["fleet"]["waiting"]
        .as_u64()
        .unwrap()
}

#[test]
fn nginx_two_instances_and_postgresql_agree_exactly_after_an_outage_and_a_sigkill() {
    if !require_tool("nginx", "nginx-light") {
        return;
    }
    let Some(pg) = Postgres::start("deploy") else {
        return;
    };
    let dir = temp_path("deploy");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (Instance::new("a", &dir), Instance::new("b", &dir));
    let mut server_a = a.start(&pg);
    let server_b = b.start(&pg);
    let nginx = Nginx::start(&dir, &a, &b);
    let mut sent = 0;
    let traffic = |rounds: u64| -> u64 {
        let mut sum = 0;
        for i in 0..rounds {
            sum += nginx.post(1000 + i) + a.udp(50, 3) + b.udp(50, 7);
        }
        sum
    };
    sent += traffic(20);
    // PostgreSQL stops; the instances keep serving, through nginx too.
    pg.crash();
    sent += traffic(20);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        waiting(&a) > 0 && waiting(&b) > 0,
        "records wait during the outage"
    );
    // One instance dies while the database is down and comes back.
    let (_, _) = server_a.signal(Signal::SIGKILL);
    server_a = a.start(&pg);
    sent += traffic(10);
    pg.start_again();
    sent += traffic(10);
    let deadline = Instant::now() + Duration::from_secs(30);
    // The history first: a record it adds between the two checks would otherwise pass unshipped.
    while history_behind(&a) || history_behind(&b) || waiting(&a) > 0 || waiting(&b) > 0 {
        assert!(Instant::now() < deadline, "the instances did not catch up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let fleet = fleet_summary(&pg);
    let (count_a, count_b) = (a.counter(), b.counter());
    assert_eq!(count_a + count_b, sent, "every increment counted once");
    for (instance, count) in [(&a, count_a), (&b, count_b)] {
        let local = instance.json("/summary")["total"].clone();
        assert_eq!(
            local["increments"].as_u64(),
            Some(count),
            "{} /summary",
            instance.name
        );
        assert_eq!(
            fleet["instances"][instance.name], local,
            "{}: fleet and /summary",
            instance.name
        );
    }
    assert_eq!(fleet["total"]["increments"].as_u64(), Some(sent));
    drop(nginx);
    let (ok, _) = server_b.terminate();
    assert!(ok);
    drop(server_a);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether the history has not yet recorded the counter's current value.
fn history_behind(instance: &Instance) -> bool {
    instance.json("/summary")["total"]["increments"].as_u64() != Some(instance.counter())
}

#[test]
fn the_template_unit_with_the_fleet_drop_in_passes_systemd_analyze_verify() {
    if !require_tool("systemd-analyze", "systemd") {
        return;
    }
    let dir = temp_path("template-unit");
    let drop_in = dir.join("ricochet@.service.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    // As the drop-in's comment says: the packaged unit, copied as a template (ExecStart pointed at
    // the binary under test, which verify checks exists).
    let unit = std::fs::read_to_string(deploy("../ricochet.service")).unwrap();
    std::fs::write(
        dir.join("ricochet@.service"),
        unit.replace("/usr/bin/ricochet", BIN),
    )
    .unwrap();
    let conf = std::fs::read_to_string(deploy("fleet.conf")).unwrap();
    assert!(conf.contains("ExecStart=/usr/bin/ricochet serve --config /etc/ricochet/%i.toml"));
    std::fs::write(
        drop_in.join("fleet.conf"),
        conf.replace("/usr/bin/ricochet", BIN),
    )
    .unwrap();
    assert_unit_verifies(&dir.join("ricochet@a.service"), Some(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}
