//! The fleet's PostgreSQL schema, versioned: every shipper migrates it on connecting, under an
//! advisory lock, so instances starting together apply each version once.
//!
//! - `ricochet_seconds`: one row per (instance, second), range-partitioned by UTC day
//!   (`ricochet_seconds_pYYYYMMDD`); retention drops whole days (`--fleet-retention`).
//! - `ricochet_minutes`: the per-minute rollup, rewritten from the seconds in the same transaction
//!   as every batch (so it always equals them), partitioned by UTC month (`ricochet_minutes_pYYYYMM`,
//!   `--fleet-rollup-retention`). Long ranges are answered from it.
//! - `ricochet_schema_version`: the versions applied.

use anyhow::{bail, Context, Result};
use postgres::GenericClient;
use time::{Date, Month, OffsetDateTime};

use crate::stats::DropReason;

/// Serialises migrations and partition changes between instances.
const LOCK: i64 = 0x7269_636f_6368_6574; // "ricochet"

/// The migrations, in order; version N is `MIGRATIONS[N - 1]`. Never edit one that shipped: add one.
const MIGRATIONS: [&str; 2] = [
    "
CREATE TABLE ricochet_seconds (
    instance text NOT NULL,
    second timestamptz NOT NULL,
    increments numeric(20, 0) NOT NULL,
    requests bigint NOT NULL,
    replies bigint NOT NULL,
    drop_wrong_length bigint NOT NULL,
    drop_bad_hash bigint NOT NULL,
    drop_too_short bigint NOT NULL,
    drop_oversize bigint NOT NULL,
    drop_truncated bigint NOT NULL,
    drop_fragment bigint NOT NULL,
    drop_zero_source_port bigint NOT NULL,
    drop_malformed bigint NOT NULL,
    drop_bad_descriptor bigint NOT NULL,
    PRIMARY KEY (instance, second)
) PARTITION BY RANGE (second);
CREATE TABLE ricochet_minutes (
    instance text NOT NULL,
    minute timestamptz NOT NULL,
    seconds integer NOT NULL,
    increments numeric NOT NULL,
    requests numeric NOT NULL,
    replies numeric NOT NULL,
    drop_wrong_length numeric NOT NULL,
    drop_bad_hash numeric NOT NULL,
    drop_too_short numeric NOT NULL,
    drop_oversize numeric NOT NULL,
    drop_truncated numeric NOT NULL,
    drop_fragment numeric NOT NULL,
    drop_zero_source_port numeric NOT NULL,
    drop_malformed numeric NOT NULL,
    drop_bad_descriptor numeric NOT NULL,
    PRIMARY KEY (instance, minute)
) PARTITION BY RANGE (minute);
",
    "
-- Each instance name belongs to one state directory (its history's owner id): two processes
-- under one name would overwrite each other's rows.
CREATE TABLE ricochet_instances (
    instance text PRIMARY KEY,
    owner bigint NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
",
];

/// The schema version this build writes.
pub const VERSION: i32 = MIGRATIONS.len() as i32;

/// The counted columns shared by both tables, in [`crate::history::Second`]'s order.
pub fn counted_columns() -> Vec<String> {
    let mut columns = vec![
        "increments".to_string(),
        "requests".into(),
        "replies".into(),
    ];
    columns.extend(
        DropReason::ALL
            .iter()
            .map(|r| format!("drop_{}", r.as_str())),
    );
    columns
}

/// Brings the schema to [`VERSION`]; refuses a database a newer ricochet migrated.
pub fn migrate(client: &mut impl GenericClient) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS ricochet_schema_version (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM ricochet_schema_version",
            &[],
        )?
        .get(0);
    if current > VERSION {
        bail!("the fleet database has schema version {current}, newer than this ricochet's {VERSION}: upgrade ricochet");
    }
    for version in current + 1..=VERSION {
        tx.batch_execute(MIGRATIONS[version as usize - 1])
            .with_context(|| format!("migration to schema version {version} failed"))?;
        tx.execute(
            "INSERT INTO ricochet_schema_version (version) VALUES ($1)",
            &[&version],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The UTC day of a Unix second, as days since the epoch.
pub fn day_of(second: i64) -> i64 {
    second.div_euclid(86_400)
}

fn date_of_day(day: i64) -> Result<Date> {
    Ok(OffsetDateTime::from_unix_timestamp(day * 86_400)
        .context("a second out of range")?
        .date())
}

/// The partition holding `day`'s seconds and its bounds (UTC).
pub fn second_partition(day: i64) -> Result<(String, String, String)> {
    let (from, to) = (date_of_day(day)?, date_of_day(day + 1)?);
    let name = format!(
        "ricochet_seconds_p{:04}{:02}{:02}",
        from.year(),
        from.month() as u8,
        from.day()
    );
    Ok((name, utc_midnight(from), utc_midnight(to)))
}

/// The partition holding the minutes of the month of `day`, and its bounds.
pub fn minute_partition(day: i64) -> Result<(String, String, String)> {
    let date = date_of_day(day)?;
    let first = Date::from_calendar_date(date.year(), date.month(), 1)?;
    let next = match date.month() {
        Month::December => Date::from_calendar_date(date.year() + 1, Month::January, 1)?,
        month => Date::from_calendar_date(date.year(), month.next(), 1)?,
    };
    let name = format!(
        "ricochet_minutes_p{:04}{:02}",
        date.year(),
        date.month() as u8
    );
    Ok((name, utc_midnight(first), utc_midnight(next)))
}

fn utc_midnight(date: Date) -> String {
    format!(
        "{:04}-{:02}-{:02} 00:00:00+00",
        date.year(),
        date.month() as u8,
        date.day()
    )
}

/// Creates the partitions that `days` need (seconds by day, minutes by month), if missing.
pub fn ensure_partitions(client: &mut impl GenericClient, days: &[i64]) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])?;
    for &day in days {
        for (parent, (name, from, to)) in [
            ("ricochet_seconds", second_partition(day)?),
            ("ricochet_minutes", minute_partition(day)?),
        ] {
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {parent} FOR VALUES FROM ('{from}') TO ('{to}')"
            ))?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Drops the partitions of `parent` that end at or before `before` (Unix seconds). Returns their names.
pub fn drop_partitions_before(
    client: &mut impl GenericClient,
    parent: &str,
    before: i64,
) -> Result<Vec<String>> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])?;
    let rows = tx.query(
        "SELECT c.oid::regclass::text FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = $1::text::regclass
            AND (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz
                <= to_timestamp($2::float8)",
        &[&parent, &(before as f64)],
    )?;
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for name in &names {
        tx.batch_execute(&format!("DROP TABLE {name}"))?;
    }
    tx.commit()?;
    Ok(names)
}

/// Claims `instance` for the state directory whose history has `owner`; refuses a name another
/// directory holds.
pub fn claim(client: &mut impl GenericClient, instance: &str, owner: i64) -> Result<()> {
    client.execute(
        "INSERT INTO ricochet_instances (instance, owner) VALUES ($1, $2) ON CONFLICT (instance) DO NOTHING",
        &[&instance, &owner],
    )?;
    let holder: i64 = client
        .query_one(
            "SELECT owner FROM ricochet_instances WHERE instance = $1",
            &[&instance],
        )?
        .get(0);
    if holder != owner {
        bail!("the instance name '{instance}' belongs to another state directory: give each instance its own --instance (if this directory replaced that one, delete the name's row from ricochet_instances)");
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn partitions_are_named_and_bounded_by_utc_day_and_month() {
        let day = day_of(1_767_225_599); // 2025-12-31T23:59:59Z
        assert_eq!(
            second_partition(day).unwrap(),
            (
                "ricochet_seconds_p20251231".into(),
                "2025-12-31 00:00:00+00".into(),
                "2026-01-01 00:00:00+00".into()
            )
        );
        assert_eq!(
            minute_partition(day).unwrap(),
            (
                "ricochet_minutes_p202512".into(),
                "2025-12-01 00:00:00+00".into(),
                "2026-01-01 00:00:00+00".into()
            )
        );
        assert_eq!(day_of(-1), -1);
    }

    #[test]
    fn both_tables_have_every_counted_column() {
        for column in counted_columns() {
            assert_eq!(
                MIGRATIONS[0].matches(&format!("    {column} ")).count(),
                2,
                "{column}"
            );
        }
    }
}
