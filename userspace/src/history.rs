//! Per-second history (`serve --state-dir DIR`): every second of service becomes one record in
//! `DIR/history.sqlite` (SQLite through rusqlite, WAL journal), kept for `--history-retention`.
//!
//! A record holds the second's increments, requests, replies and drops by reason. Increments are
//! derived from the durable counter, not counted beside it: the store keeps the counter's value at
//! the end of the last record, and the next record takes the difference. A SIGKILL therefore loses
//! no increment; what was counted after the last record lands in the first record after the
//! restart. Requests, replies and drops are the process's own statistics: the part of a second a
//! crash cut short is lost with the process.
//!
//! Records also wait here for the fleet shipper (the `fleet` module): each row carries a revision,
//! bumped on every write, and the revision last shipped. A row is waiting while the two differ.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rusqlite::TransactionBehavior::Immediate;
use rusqlite::{params, Connection, OptionalExtension};

use crate::stats::DropReason;

/// The store's file inside the state directory.
pub const FILE: &str = "history.sqlite";

/// Version 1 of the local schema. One column per drop reason; a test keeps it in step with
/// [`DropReason::ALL`], so a new reason needs a new version here and in the `fleet` schema.
const SCHEMA_V1: &str = "
CREATE TABLE seconds (
    second INTEGER PRIMARY KEY,      -- Unix seconds: the record covers [second, second + 1)
    increments INTEGER NOT NULL,     -- a u64, stored by its bits
    requests INTEGER NOT NULL,
    replies INTEGER NOT NULL,
    drop_wrong_length INTEGER NOT NULL,
    drop_bad_hash INTEGER NOT NULL,
    drop_too_short INTEGER NOT NULL,
    drop_oversize INTEGER NOT NULL,
    drop_truncated INTEGER NOT NULL,
    drop_fragment INTEGER NOT NULL,
    drop_zero_source_port INTEGER NOT NULL,
    drop_malformed INTEGER NOT NULL,
    drop_bad_descriptor INTEGER NOT NULL,
    rev INTEGER NOT NULL,            -- bumped by every write
    shipped_rev INTEGER NOT NULL     -- the revision the fleet acknowledged
) STRICT;
CREATE INDEX waiting ON seconds (second) WHERE shipped_rev < rev;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
";

/// Cumulative readings of a running process: the counter and the totals of its statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    pub counter: u64,
    pub requests: u64,
    pub replies: u64,
    pub drops: [u64; DropReason::COUNT],
}

impl Reading {
    /// Field by field, the larger of the two.
    fn max(&self, other: &Reading) -> Reading {
        let mut drops = self.drops;
        for (a, b) in drops.iter_mut().zip(other.drops) {
            *a = (*a).max(b);
        }
        Reading {
            counter: self.counter.max(other.counter),
            requests: self.requests.max(other.requests),
            replies: self.replies.max(other.replies),
            drops,
        }
    }
}

/// One second of service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Second {
    /// Unix seconds.
    pub second: i64,
    pub increments: u64,
    pub requests: u64,
    pub replies: u64,
    #[serde(serialize_with = "drops_object")]
    pub drops: [u64; DropReason::COUNT],
}

impl Second {
    /// Adds `other`'s counts (a second recorded twice: a restart within it, or a clock step back).
    pub fn merge(&mut self, other: &Second) {
        self.increments = self.increments.wrapping_add(other.increments);
        self.requests += other.requests;
        self.replies += other.replies;
        for (a, b) in self.drops.iter_mut().zip(other.drops) {
            *a += b;
        }
    }
}

/// Serialises drops as `{"reason": n}`.
pub fn drops_object<S: serde::Serializer>(
    drops: &[u64; DropReason::COUNT],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(DropReason::COUNT))?;
    for reason in DropReason::ALL {
        map.serialize_entry(reason.as_str(), &drops[reason.index()])?;
    }
    map.end()
}

/// Sans-IO: turns cumulative readings into per-second records.
#[derive(Debug, Clone, Copy)]
pub struct Recorder {
    last: Reading,
}

impl Recorder {
    /// `last` is the reading the next record counts from: the counter where the history's last
    /// record left it, and the statistics at zero (a process's statistics start there).
    pub fn new(last: Reading) -> Recorder {
        Recorder { last }
    }

    /// The record for `second`, made of what changed since the last reading.
    pub fn record(&mut self, second: i64, now: Reading) -> Second {
        let last = self.last;
        // Readings only grow, so the last one is kept field by field at its highest: a counter that
        // resumed below the last recorded value (from an older snapshot after a machine crash)
        // re-issues values already recorded, which are not counted again; a reading that briefly
        // came back short (an XDP statistics read that failed) does not count twice what follows.
        self.last = last.max(&now);
        let mut drops = [0; DropReason::COUNT];
        for (i, d) in drops.iter_mut().enumerate() {
            *d = now.drops[i].saturating_sub(last.drops[i]);
        }
        Second {
            second,
            increments: now.counter.saturating_sub(last.counter),
            requests: now.requests.saturating_sub(last.requests),
            replies: now.replies.saturating_sub(last.replies),
            drops,
        }
    }

    pub fn counter(&self) -> u64 {
        self.last.counter
    }
}

/// A record waiting for the fleet, with the revision that shipping it acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub record: Second,
    pub rev: i64,
}

/// Totals over a range of records, and the records themselves when asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// Summed over many seconds, increments can pass 2^64.
    pub increments: u128,
    pub requests: u64,
    pub replies: u64,
    #[serde(serialize_with = "drops_object")]
    pub drops: [u64; DropReason::COUNT],
}

impl Totals {
    /// Adds another range's totals.
    pub fn merge(&mut self, other: &Totals) {
        self.increments += other.increments;
        self.requests += other.requests;
        self.replies += other.replies;
        for (a, b) in self.drops.iter_mut().zip(other.drops) {
            *a += b;
        }
    }

    pub fn add(&mut self, s: &Second) {
        self.increments += u128::from(s.increments);
        self.requests += s.requests;
        self.replies += s.replies;
        for (a, b) in self.drops.iter_mut().zip(s.drops) {
            *a += b;
        }
    }
}

/// The column list of a record, in [`Second`]'s order.
fn columns() -> String {
    let drops: Vec<String> = DropReason::ALL
        .iter()
        .map(|r| format!("drop_{}", r.as_str()))
        .collect();
    format!(
        "second, increments, requests, replies, {}",
        drops.join(", ")
    )
}

fn to_sql(n: u64) -> i64 {
    n as i64
}

fn from_sql(n: i64) -> u64 {
    n as u64
}

fn read_second(row: &rusqlite::Row<'_>) -> rusqlite::Result<Second> {
    let mut drops = [0; DropReason::COUNT];
    for (i, d) in drops.iter_mut().enumerate() {
        *d = from_sql(row.get(4 + i)?);
    }
    Ok(Second {
        second: row.get(0)?,
        increments: from_sql(row.get(1)?),
        requests: from_sql(row.get(2)?),
        replies: from_sql(row.get(3)?),
        drops,
    })
}

/// One connection to the store. The recorder, the shipper and the HTTP endpoints each hold their
/// own; SQLite's WAL lets them read while one writes.
pub struct History {
    conn: Connection,
    path: PathBuf,
}

impl History {
    /// Opens (creating and migrating) `DIR/history.sqlite`.
    pub fn open(dir: &Path) -> Result<History> {
        let path = dir.join(FILE);
        let conn = Connection::open(&path)
            .with_context(|| format!("cannot open the history store {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // A machine crash may lose the last records' commits, never the database.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let history = History { conn, path };
        history.migrate().with_context(|| {
            format!("cannot set up the history store {}", history.path.display())
        })?;
        Ok(history)
    }

    fn migrate(&self) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        match version {
            0 => {
                let tx = self.conn.unchecked_transaction()?;
                tx.execute_batch(SCHEMA_V1)?;
                tx.pragma_update(None, "user_version", 1)?;
                tx.commit()?;
                Ok(())
            }
            1 => Ok(()),
            v => bail!("the store has schema version {v}, newer than this ricochet (1): run a newer ricochet or move the file away"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// With `--user`: the store's files become that user's (the directory is 0700 and still root's,
    /// so nobody can have put a link in their place).
    pub fn hand_over(&self, uid: u32, gid: u32) -> Result<()> {
        for suffix in ["", "-wal", "-shm"] {
            let mut name = self.path.clone().into_os_string();
            name.push(suffix);
            match std::os::unix::fs::lchown(&name, Some(uid), Some(gid)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other.with_context(|| {
                    format!("cannot give {} to the user", Path::new(&name).display())
                })?,
            }
        }
        Ok(())
    }

    /// The counter at the end of the last record, if there is one.
    pub fn last_counter(&self) -> Result<Option<u64>> {
        let value: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'counter'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(value.map(from_sql))
    }

    /// This store's random owner id (made once, kept in the store): the fleet ties an instance name
    /// to it, so that two state directories cannot ship under one name.
    pub fn owner(&self) -> Result<i64> {
        let seed = format!(
            "{:?} {} {}",
            SystemTime::now(),
            std::process::id(),
            self.path.display()
        );
        let fresh = xxhash_rust::xxh64::xxh64(seed.as_bytes(), 0) as i64;
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('owner', ?1) ON CONFLICT (key) DO NOTHING",
            [fresh],
        )?;
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'owner'", [], |r| {
                r.get(0)
            })?)
    }

    /// Stores where a new history starts counting from (the counter before this process served
    /// anything), so that a crash before the first record loses nothing either.
    pub fn set_start(&self, counter: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('counter', ?1) ON CONFLICT (key) DO NOTHING",
            [to_sql(counter)],
        )?;
        Ok(())
    }

    /// Stores `record` (adding to a record of the same second) and the counter it ends at.
    pub fn append(&mut self, record: &Second, counter: u64) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(Immediate)?;
        let existing = tx
            .query_row(
                &format!("SELECT {} FROM seconds WHERE second = ?1", columns()),
                [record.second],
                read_second,
            )
            .optional()?;
        let mut merged = *record;
        if let Some(old) = existing {
            merged.merge(&old);
        }
        let mut values: Vec<i64> = vec![merged.second, to_sql(merged.increments)];
        values.extend([merged.requests, merged.replies].map(to_sql));
        values.extend(merged.drops.map(to_sql));
        let marks: Vec<String> = (1..=values.len()).map(|i| format!("?{i}")).collect();
        tx.execute(
            &format!(
                "INSERT INTO seconds ({}, rev, shipped_rev) VALUES ({}, 1, 0)
                 ON CONFLICT (second) DO UPDATE SET {}, rev = rev + 1",
                columns(),
                marks.join(", "),
                update_list()
            ),
            rusqlite::params_from_iter(values),
        )?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('counter', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [to_sql(counter)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Totals of the records with `from <= second < to`, and the records if `series`.
    pub fn summary(&self, from: i64, to: i64, series: bool) -> Result<(Totals, Vec<Second>)> {
        let mut statement = self.conn.prepare_cached(&format!(
            "SELECT {} FROM seconds WHERE second >= ?1 AND second < ?2 ORDER BY second",
            columns()
        ))?;
        let mut totals = Totals::default();
        let mut seconds = Vec::new();
        for row in statement.query_map([from, to], read_second)? {
            let record = row?;
            totals.add(&record);
            if series {
                seconds.push(record);
            }
        }
        Ok((totals, seconds))
    }

    /// The first recorded second, if any.
    pub fn first_second(&self) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row("SELECT min(second) FROM seconds", [], |r| r.get(0))?)
    }

    /// Up to `limit` records waiting for the fleet, oldest first.
    pub fn waiting(&self, limit: usize) -> Result<Vec<Waiting>> {
        let mut statement = self.conn.prepare_cached(&format!(
            "SELECT {}, rev FROM seconds WHERE shipped_rev < rev ORDER BY second LIMIT ?1",
            columns()
        ))?;
        let rev_at = 4 + DropReason::COUNT;
        let rows = statement.query_map([limit as i64], |row| {
            Ok(Waiting {
                record: read_second(row)?,
                rev: row.get(rev_at)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many records wait, and the oldest one's second.
    pub fn backlog(&self) -> Result<(u64, Option<i64>)> {
        Ok(self.conn.query_row(
            "SELECT count(*), min(second) FROM seconds WHERE shipped_rev < rev",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )?)
    }

    /// Marks `records` shipped, each at the revision that was shipped: a record rewritten meanwhile
    /// stays waiting.
    pub fn mark_shipped(&mut self, records: &[Waiting]) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(Immediate)?;
        {
            let mut statement = tx.prepare_cached(
                "UPDATE seconds SET shipped_rev = ?2 WHERE second = ?1 AND rev = ?2",
            )?;
            for w in records {
                statement.execute(params![w.record.second, w.rev])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes records older than `before`; with `keep_waiting`, not those still waiting for the
    /// fleet. Returns how many went.
    pub fn prune(&self, before: i64, keep_waiting: bool) -> Result<usize> {
        let sql = if keep_waiting {
            "DELETE FROM seconds WHERE second < ?1 AND shipped_rev = rev"
        } else {
            "DELETE FROM seconds WHERE second < ?1"
        };
        Ok(self.conn.execute(sql, [before])?)
    }
}

fn update_list() -> String {
    columns()
        .split(", ")
        .skip(1)
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Now, in whole Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Parses a time bound: Unix seconds or RFC 3339 (`2026-12-04T16:00:00Z`, `...+01:00`).
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    // The years 1 to 9999, so that every bound can be written as RFC 3339.
    const RANGE: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;
    if let Ok(n) = text.parse::<i64>() {
        return match RANGE.contains(&n) {
            true => Ok(n),
            false => Err(format!("'{text}' is outside the years 1 to 9999")),
        };
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| {
            format!("'{text}' is not a time: give Unix seconds or RFC 3339 (2026-12-04T16:00:00Z)")
        })
}

/// Unix seconds as RFC 3339, in UTC.
pub fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod test {
    use super::*;

    fn reading(counter: u64, requests: u64, bad_hash: u64) -> Reading {
        let mut drops = [0; DropReason::COUNT];
        drops[DropReason::BadHash.index()] = bad_hash;
        Reading {
            counter,
            requests,
            replies: requests - bad_hash,
            drops,
        }
    }

    #[test]
    fn records_are_differences_and_increments_come_from_the_counter() {
        // The last record left the counter at 100; this process's statistics start at zero.
        let mut recorder = Recorder::new(Reading {
            counter: 100,
            ..Reading::default()
        });
        // 30 increments happened before the restart, 12 after, in 10 requests (2 bad).
        let s = recorder.record(1000, reading(142, 10, 2));
        assert_eq!(
            (s.second, s.increments, s.requests, s.replies),
            (1000, 42, 10, 8)
        );
        assert_eq!(s.drops[DropReason::BadHash.index()], 2);
        let s = recorder.record(1001, reading(142, 10, 2));
        assert_eq!(
            (s.increments, s.requests, s.drops),
            (0, 0, [0; DropReason::COUNT])
        );
        assert_eq!(recorder.counter(), 142);
    }

    #[test]
    fn values_re_issued_below_the_last_record_and_short_readings_are_not_counted_twice() {
        let mut recorder = Recorder::new(Reading {
            counter: 100,
            ..Reading::default()
        });
        // Resumed at 90 (an older snapshot): 90..100 were recorded already.
        assert_eq!(recorder.record(1, reading(95, 5, 0)).increments, 0);
        assert_eq!(recorder.record(2, reading(107, 12, 0)).increments, 7);
        // A reading that comes back short, then recovers: nothing is counted twice.
        let short = Reading::default();
        assert_eq!(recorder.record(3, short).requests, 0);
        let s = recorder.record(4, reading(110, 13, 0));
        assert_eq!((s.increments, s.requests), (3, 1));
    }

    #[test]
    fn the_schema_has_a_column_for_every_drop_reason() {
        for reason in DropReason::ALL {
            let column = format!("drop_{} INTEGER", reason.as_str());
            assert!(SCHEMA_V1.contains(&column), "no column {column}");
        }
    }

    #[test]
    fn a_second_written_twice_adds_up_and_waits_again() {
        let dir = std::env::temp_dir().join(format!("ricochet-history-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut h = History::open(&dir).unwrap();
        let mut s = Second {
            second: 50,
            increments: u64::MAX - 10,
            requests: 3,
            ..Second::default()
        };
        h.append(&s, 7).unwrap();
        let waiting = h.waiting(10).unwrap();
        assert_eq!(waiting.len(), 1);
        h.mark_shipped(&waiting).unwrap();
        assert_eq!(h.backlog().unwrap(), (0, None));
        s.increments = 5;
        h.append(&s, 9).unwrap();
        // Shipping the old revision does not acknowledge the new one.
        h.mark_shipped(&waiting).unwrap();
        assert_eq!(h.backlog().unwrap(), (1, Some(50)));
        let (totals, series) = h.summary(0, 100, true).unwrap();
        assert_eq!(totals.increments, u128::from(u64::MAX - 5));
        assert_eq!((totals.requests, series.len()), (6, 1));
        assert_eq!(h.last_counter().unwrap(), Some(9));
        drop(h);
        let h = History::open(&dir).unwrap();
        assert_eq!(h.summary(51, 100, false).unwrap().0, Totals::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn times_parse_as_unix_seconds_or_rfc3339() {
        assert_eq!(parse_time("1764864000"), Ok(1_764_864_000));
        assert_eq!(parse_time("2025-12-04T16:00:00Z"), Ok(1_764_864_000));
        assert_eq!(parse_time("2025-12-04T17:00:00+01:00"), Ok(1_764_864_000));
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(format_time(1_764_864_000), "2025-12-04T16:00:00Z");
    }
}
