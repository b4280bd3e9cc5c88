//! The per-second history and the fleet, end to end against real servers: `serve --state-dir`'s
//! `/summary` equals the counter across SIGKILL; `serve --fleet` ships to a real PostgreSQL through
//! an outage, a SIGKILL and a replay without losing or double counting; a fallback takes over from
//! a dead primary and hands back; a one-hour fleet summary reads one day partition.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::*;
use nix::sys::signal::Signal;
use ricochet::fleet::schema;
use serde_json::Value;

fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

fn state_dir(tag: &str) -> PathBuf {
    let dir = temp_path(&format!("fleet-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `serve` on a fixed UDP port (kept across restarts) with a state directory and `extra` flags.
fn start(dir: &Path, port: u16, extra: &[&str]) -> Server {
    let listen = format!("udp://127.0.0.1:{port}");
    let mut args = vec!["--listen", &listen, "--state-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Sends `n` counter requests with increments 1..=997 (every reply checked); returns their sum.
fn send(port: u16, n: usize, seed: u64) -> u64 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(("127.0.0.1", port)).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut rng = Rng::new(seed);
    let mut sum = 0;
    let mut buf = [0u8; 64];
    for _ in 0..n {
        let increment = 1 + rng.below(997);
        socket.send(&frame(increment)).unwrap();
        let got = socket.recv(&mut buf).expect("a reply within 5 s");
        assert_eq!(got, 16);
        sum += increment;
    }
    sum
}

/// Sends `n` frames whose hash is wrong: each is dropped as bad_hash.
fn send_bad(port: u16, n: usize) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..n {
        let mut bad = frame(5 + i as u64);
        bad[15] ^= 0xff;
        socket.send_to(&bad, ("127.0.0.1", port)).unwrap();
    }
}

/// POST /counter {"increment": n}.
fn post_increment(http: SocketAddr, n: u64) {
    let conn = std::net::TcpStream::connect(http).unwrap();
    let body = format!("{{\"increment\": {n}}}");
    let (status, reply) = http_exchange(conn, "POST", "/counter", &body);
    assert_eq!(status, 200, "{reply}");
}

fn get_json(http: SocketAddr, path: &str) -> Value {
    let (status, body) = http_get(http, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn counter(http: SocketAddr) -> u64 {
    get_json(http, "/counter")["value"].as_u64().unwrap()
}

/// A metric's value from /metrics (`name` with its labels, as printed).
fn metric(http: SocketAddr, name: &str) -> f64 {
    let (_, text) = http_get(http, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Polls `check` every 100 ms until it holds; fails after `limit` with `what`.
fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `/summary`'s total increments (u64 here: the tests' sums are small).
fn summary_increments(http: SocketAddr) -> u64 {
    get_json(http, "/summary")["total"]["increments"]
        .as_u64()
        .unwrap()
}

/// `ricochet fleet summary --json` through the real command.
fn fleet_summary(urls: &[String], range: &[&str]) -> Value {
    try_fleet_summary(urls, range).unwrap_or_else(|e| panic!("ricochet fleet summary: {e}"))
}

/// The same, or its error (a database no shipper has reached yet has no tables).
fn try_fleet_summary(urls: &[String], range: &[&str]) -> Result<Value, String> {
    let mut command = Command::new(BIN);
    command.args(["fleet", "summary", "--json"]);
    for url in urls {
        command.args(["--fleet", url]);
    }
    let out = command.args(range).output().unwrap();
    match out.status.success() {
        true => Ok(serde_json::from_slice(&out.stdout).unwrap()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// Whether the fleet already shows `expected` increments for `instance`.
fn fleet_has(urls: &[String], instance: &str, expected: u64) -> bool {
    try_fleet_summary(urls, &[]).is_ok_and(|s| instance_increments(&s, instance) == expected)
}

fn instance_increments(summary: &Value, instance: &str) -> u64 {
    summary["instances"][instance]["increments"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn the_history_keeps_every_increment_across_sigkill_and_summary_equals_the_counter() {
    let dir = state_dir("history");
    let port = free_udp_port();
    let server = start(&dir, port, &[]);
    let http = server.addr("http+");
    let mut sum = send(port, 3000, 1);
    post_increment(http, 1_000_000);
    sum += 1_000_000;
    // Killed right after the last request: the history has not recorded the last second yet, but
    // the counter has; the next record takes the difference.
    let (_, _) = server.signal(Signal::SIGKILL);
    let server = start(&dir, port, &[]);
    let http = server.addr("http+");
    assert_eq!(counter(http), sum);
    sum += send(port, 2000, 2);
    send_bad(port, 7);
    wait_until(
        Duration::from_secs(5),
        "/summary holds every increment",
        || summary_increments(http) == sum,
    );
    let all = get_json(http, "/summary?series=1");
    let series = all["seconds"].as_array().unwrap();
    let seconds: Vec<i64> = series
        .iter()
        .map(|s| s["second"].as_i64().unwrap())
        .collect();
    assert!(seconds.windows(2).all(|w| w[0] < w[1]), "{seconds:?}");
    let series_sum: u64 = series
        .iter()
        .map(|s| s["increments"].as_u64().unwrap())
        .sum();
    assert_eq!(series_sum, sum);
    // The bad frames were counted as drops, in some second of this run.
    wait_until(Duration::from_secs(5), "the drops are recorded", || {
        get_json(http, "/summary")["total"]["drops"]["bad_hash"] == 7
    });
    // A split range adds up to the whole, with RFC 3339 bounds too.
    let mid = seconds[seconds.len() / 2];
    let before = get_json(http, &format!("/summary?to={mid}"));
    let after = get_json(
        http,
        &format!("/summary?from={}", ricochet::history::format_time(mid)),
    );
    let parts = before["total"]["increments"].as_u64().unwrap()
        + after["total"]["increments"].as_u64().unwrap();
    assert_eq!(parts, sum);
    let (status, body) = http_get(http, "/summary?from=tomorrow");
    assert_eq!(status, 400, "{body}");
    // SIGTERM writes the part of the current second served so far: equal at once after a restart.
    sum += send(port, 500, 3);
    let (ok, _) = server.terminate();
    assert!(ok);
    let server = start(&dir, port, &[]);
    let http = server.addr("http+");
    assert_eq!(summary_increments(http), sum);
    assert_eq!(counter(http), sum);
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_a_state_directory_summary_says_what_it_needs() {
    let server = Server::start(&["--listen", "udp://127.0.0.1:0"]);
    let (status, body) = http_get(server.addr("http+"), "/summary");
    assert_eq!(status, 404);
    assert!(body.contains("--state-dir"), "{body}");
}

/// A per-target fleet metric's name with its label.
fn target_metric(name: &str, pg: &Postgres) -> String {
    format!(
        "ricochet_fleet_{name}{{target=\"127.0.0.1:{}/postgres\"}}",
        pg.port
    )
}

/// Waits until nothing waits for the fleet and returns the fleet's view of `instance`.
fn wait_shipped(http: SocketAddr, urls: &[String], instance: &str, expected: u64) -> Value {
    wait_until(Duration::from_secs(30), "every record is shipped", || {
        metric(http, "ricochet_fleet_waiting_records") == 0.0 && fleet_has(urls, instance, expected)
    });
    fleet_summary(urls, &[])
}

#[test]
fn the_fleet_gets_every_record_exactly_once_through_an_outage_a_sigkill_and_a_replay() {
    let Some(pg) = Postgres::start("outage") else {
        return;
    };
    let urls = vec![pg.url()];
    let dir = state_dir("outage");
    let port = free_udp_port();
    let flags = [
        "--fleet",
        &urls[0],
        "--fleet-interval",
        "200ms",
        "--instance",
        "alpha",
    ];
    let server = start(&dir, port, &flags);
    let http = server.addr("http+");
    let mut sum = send(port, 2000, 11);
    wait_shipped(http, &urls, "alpha", sum);
    assert_eq!(metric(http, &target_metric("up", &pg)), 1.0);

    // The database goes away: the packet path does not notice, records wait, the breaker opens.
    pg.crash();
    sum += send(port, 2000, 12);
    wait_until(
        Duration::from_secs(15),
        "the breaker opens and records wait",
        || {
            metric(http, &target_metric("breaker_state", &pg)) == 2.0
                && metric(http, "ricochet_fleet_waiting_records") > 0.0
        },
    );
    assert_eq!(metric(http, &target_metric("up", &pg)), 0.0);
    // SIGKILL while the database is still down; the next start serves without it.
    let (_, _) = server.signal(Signal::SIGKILL);
    let server = start(&dir, port, &flags);
    let http = server.addr("http+");
    sum += send(port, 1000, 13);
    pg.start_again();
    let fleet = wait_shipped(http, &urls, "alpha", sum);
    assert_eq!(counter(http), sum);
    let local = get_json(http, "/summary");
    assert_eq!(
        fleet["instances"]["alpha"], local["total"],
        "the fleet and /summary agree"
    );

    // A replay: every record marked unshipped and sent again changes nothing.
    let (ok, _) = server.terminate();
    assert!(ok);
    let rows = reset_shipped(&dir);
    let server = start(&dir, port, &flags);
    let http = server.addr("http+");
    wait_until(Duration::from_secs(30), "the replay is shipped", || {
        metric(http, "ricochet_fleet_shipped_records_total") >= rows as f64
            && metric(http, "ricochet_fleet_waiting_records") == 0.0
    });
    let replayed = fleet_summary(&urls, &[]);
    assert_eq!(instance_increments(&replayed, "alpha"), sum);
    assert_eq!(replayed["total"], get_json(http, "/summary")["total"]);
    assert_rollup_matches_seconds(&pg);
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Marks every local record unshipped (as a lost acknowledgement would leave them); returns how many.
fn reset_shipped(dir: &Path) -> usize {
    let db = rusqlite::Connection::open(dir.join("history.sqlite")).unwrap();
    db.execute("UPDATE seconds SET shipped_rev = 0", [])
        .unwrap()
}

/// The per-minute rollup holds exactly the per-second rows' sums.
fn assert_rollup_matches_seconds(pg: &Postgres) {
    let mut client = pg.client();
    let row = client
        .query_one(
            "SELECT (SELECT sum(increments)::text FROM ricochet_seconds),
                    (SELECT sum(increments)::text FROM ricochet_minutes),
                    (SELECT count(*) FROM ricochet_seconds),
                    (SELECT sum(seconds)::bigint FROM ricochet_minutes)",
            &[],
        )
        .unwrap();
    let (seconds, minutes): (String, String) = (row.get(0), row.get(1));
    assert_eq!(seconds, minutes);
    assert_eq!(row.get::<_, i64>(2), row.get::<_, i64>(3));
}

#[test]
fn a_fallback_takes_the_records_while_the_primary_is_down_and_the_primary_takes_them_once_back() {
    let (Some(primary), Some(fallback)) = (Postgres::start("primary"), Postgres::start("fallback"))
    else {
        return;
    };
    primary.crash();
    let urls = [primary.url(), fallback.url()];
    let dir = state_dir("fallback");
    let port = free_udp_port();
    let flags = [
        "--fleet",
        &urls[0],
        "--fleet",
        &urls[1],
        "--fleet-interval",
        "200ms",
        "--instance",
        "beta",
    ];
    let server = start(&dir, port, &flags);
    let http = server.addr("http+");
    let mut sum = send(port, 1000, 21);
    wait_until(
        Duration::from_secs(30),
        "the fallback has every record",
        || {
            metric(http, "ricochet_fleet_waiting_records") == 0.0
                && fleet_has(&urls[1..], "beta", sum)
        },
    );
    assert_eq!(metric(http, &target_metric("up", &primary)), 0.0);
    assert_eq!(metric(http, &target_metric("up", &fallback)), 1.0);
    // Failing rounds open the primary's breaker: it is skipped until a probe after the pause.
    wait_until(
        Duration::from_secs(30),
        "the primary's breaker opens",
        || metric(http, &target_metric("breaker_state", &primary)) == 2.0,
    );
    // The primary returns: once its breaker lets a probe through, it takes the records again.
    primary.start_again();
    wait_until(Duration::from_secs(30), "the primary is back up", || {
        metric(http, &target_metric("up", &primary)) == 1.0
    });
    sum += send(port, 1000, 22);
    let (ok, _) = server.terminate();
    assert!(ok);
    let on_primary = instance_increments(&fleet_summary(&urls[..1], &[]), "beta");
    let on_fallback = instance_increments(&fleet_summary(&urls[1..], &[]), "beta");
    assert!(
        on_primary > 0,
        "nothing reached the primary after it returned"
    );
    assert_eq!(
        on_primary + on_fallback,
        sum,
        "each record went to exactly one target"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Records for `instance`: `per_day` consecutive seconds from noon of each of `days` (UTC days).
fn records(days: &[i64], per_day: i64) -> Vec<ricochet::history::Waiting> {
    let mut out = Vec::new();
    for &day in days {
        for i in 0..per_day {
            let mut record = ricochet::history::Second {
                second: day * 86_400 + 43_200 + i,
                increments: 1000 + i as u64,
                requests: 3,
                replies: 2,
                ..Default::default()
            };
            record.drops[ricochet::stats::DropReason::BadHash.index()] = 1;
            out.push(ricochet::history::Waiting { record, rev: 1 });
        }
    }
    out
}

/// The relations an EXPLAIN (FORMAT JSON) plan reads.
fn relations(plan: &Value, out: &mut Vec<String>) {
    match plan {
        Value::Object(map) => {
            if let Some(Value::String(name)) = map.get("Relation Name") {
                out.push(name.clone());
            }
            map.values().for_each(|v| relations(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| relations(v, out)),
        _ => {}
    }
}

fn explain(client: &mut ::postgres::Client, sql: &str) -> Vec<String> {
    // The plan comes as json, which the simple protocol hands over as text.
    let messages = client
        .simple_query(&format!("EXPLAIN (FORMAT JSON) {sql}"))
        .unwrap();
    let text = messages
        .iter()
        .find_map(|m| match m {
            ::postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .expect("EXPLAIN returns a plan");
    let plan: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    relations(&plan, &mut out);
    out.sort();
    out.dedup();
    out
}

fn target(pg: &Postgres, owner: i64) -> ricochet::fleet::Target {
    let url = ricochet::fleet::TargetUrl::parse(&pg.url()).unwrap();
    ricochet::fleet::Target::new(url, "gamma", owner)
}

fn total(client: &mut ::postgres::Client, from: Option<i64>, to: i64) -> ricochet::history::Totals {
    ricochet::fleet::summary::query(client, from, Some(to))
        .unwrap()
        .total
}

#[test]
fn shipping_is_idempotent_overwrites_and_keeps_the_rollup_equal_to_the_seconds() {
    let Some(pg) = Postgres::start("upsert") else {
        return;
    };
    let today = ricochet::history::unix_now().div_euclid(86_400);
    let end = (today + 1) * 86_400;
    let mut batch = records(&[today - 1, today], 120);
    let mut client = pg.client();
    // Before any shipper reached it, the database has no tables: said, not answered with zeros.
    let e = ricochet::fleet::summary::query(&mut client, None, None).unwrap_err();
    assert!(format!("{e:#}").contains("no ricochet tables"), "{e:#}");
    let mut shipper = target(&pg, 7);
    shipper.ship(&batch, TIMEOUT).unwrap();
    let first = total(&mut client, None, end);
    let expected: u64 = batch.iter().map(|w| w.record.increments).sum();
    assert_eq!(first.increments, u128::from(expected));
    assert_eq!((first.requests, first.replies), (720, 480));
    assert_eq!(
        first.drops[ricochet::stats::DropReason::BadHash.index()],
        240
    );
    // Again, and part of it from a restarted shipper of the same directory: nothing changes.
    shipper.ship(&batch, TIMEOUT).unwrap();
    target(&pg, 7).ship(&batch[..100], TIMEOUT).unwrap();
    assert_eq!(total(&mut client, None, end), first);
    assert_rollup_matches_seconds(&pg);
    // A record rewritten (a restart within its second) overwrites its row; the minute follows.
    batch[5].record.increments += 12;
    batch[5].rev = 2;
    shipper.ship(&batch[5..6], TIMEOUT).unwrap();
    assert_eq!(
        total(&mut client, None, end).increments,
        u128::from(expected + 12)
    );
    assert_rollup_matches_seconds(&pg);
    // Another state directory under the same name is refused, and changes nothing.
    let e = target(&pg, 8).ship(&batch, TIMEOUT).unwrap_err();
    assert!(
        format!("{e:#}").contains("belongs to another state directory"),
        "{e:#}"
    );
    assert_eq!(
        total(&mut client, None, end).increments,
        u128::from(expected + 12)
    );
    schema::migrate(&mut client).unwrap();
    let versions: i64 = client
        .query_one("SELECT count(*) FROM ricochet_schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(versions, i64::from(schema::VERSION));
}

#[test]
fn a_one_hour_summary_reads_one_partition_and_retention_keeps_the_minutes() {
    use ricochet::fleet::summary::{piece_sql, plan};
    let Some(pg) = Postgres::start("schema") else {
        return;
    };
    let today = ricochet::history::unix_now().div_euclid(86_400);
    let batch = records(&[today - 9, today - 1, today], 120);
    target(&pg, 7).ship(&batch, TIMEOUT).unwrap();
    // And the first half of the next minute on the oldest day.
    let old_minute = (today - 9) * 86_400 + 43_200 + 120;
    let seconds_of = |range: std::ops::Range<i64>| -> Vec<ricochet::history::Waiting> {
        let mut all = records(&[today - 9], 180);
        all.retain(|w| range.contains(&(w.record.second - old_minute)));
        all
    };
    target(&pg, 7).ship(&seconds_of(0..30), TIMEOUT).unwrap();
    let mut client = pg.client();
    let all = total(&mut client, None, (today + 1) * 86_400);
    // One hour on whole minutes: one month partition of the rollup.
    let noon = today * 86_400 + 43_200;
    let hour = plan(Some(noon), noon + 3600);
    let (minutes, _, _) = schema::minute_partition(today).unwrap();
    assert_eq!(
        explain(&mut client, &piece_sql(&hour[0])),
        std::slice::from_ref(&minutes)
    );
    assert_eq!(total(&mut client, Some(noon), noon + 3600).requests, 360);
    // Off whole minutes: the ends come from today's seconds partition, one partition more.
    let mut read = Vec::new();
    for piece in plan(Some(noon + 30), noon + 3630) {
        read.extend(explain(&mut client, &piece_sql(&piece)));
    }
    read.sort();
    read.dedup();
    let (seconds, _, _) = schema::second_partition(today).unwrap();
    assert_eq!(read, [minutes.clone(), seconds]);
    assert_eq!(
        total(&mut client, Some(noon + 30), noon + 3630).requests,
        270
    );
    // Ten days: the same sums as everything.
    let long = total(&mut client, Some(noon - 10 * 86_400 + 30), noon + 120);
    assert_eq!(long, all);

    // Retention drops whole days of seconds; their minutes stay in the rollup.
    let dropped =
        schema::drop_partitions_before(&mut client, "ricochet_seconds", (today - 7) * 86_400)
            .unwrap();
    assert_eq!(dropped, [schema::second_partition(today - 9).unwrap().0]);
    let old_noon = noon - 9 * 86_400;
    assert_eq!(
        total(&mut client, Some(old_noon), old_noon + 3600).requests,
        450
    );
    let e =
        ricochet::fleet::summary::query(&mut client, Some(old_noon + 30), Some(old_noon + 3600))
            .unwrap_err();
    assert!(
        format!("{e:#}").contains("past the per-second retention"),
        "{e:#}"
    );
    // The second half of that minute arrives late (an instance cut off for a week): the minute
    // gains it and keeps the first half, whose seconds are gone.
    target(&pg, 7).ship(&seconds_of(30..60), TIMEOUT).unwrap();
    let minute = total(&mut client, Some(old_minute), old_minute + 60);
    assert_eq!(minute.requests, 180);
}

/// Every connection to the store is opened during set-up: a state directory whose parent the
/// process cannot enter once its capabilities are gone (root without CAP_DAC_OVERRIDE) still works.
#[test]
fn the_history_is_opened_before_privileges_drop() {
    if !require_root("a parent directory only another user may enter") {
        return;
    }
    let parent = state_dir("closed-parent");
    let dir = parent.join("state");
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&parent, Some(65534), None).unwrap();
    let port = free_udp_port();
    let server = start(&dir, port, &[]);
    let http = server.addr("http+");
    let sum = send(port, 100, 31);
    wait_until(
        Duration::from_secs(5),
        "/summary holds every increment",
        || summary_increments(http) == sum,
    );
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    std::fs::remove_dir_all(&parent).unwrap();
}
