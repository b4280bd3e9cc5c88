//! One PostgreSQL target: its connection, its breaker, and the batched, idempotent upsert.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use postgres::config::Host;
use postgres::{Client, Config, NoTls};

use super::breaker::Breaker;
use super::schema;
use crate::history::Waiting;

/// Consecutive failures that open a target's breaker, and how long it stays open.
const BREAKER_THRESHOLD: u32 = 3;
const BREAKER_PAUSE: Duration = Duration::from_secs(5);

/// A `--fleet` URL, checked, with a label that shows no password.
#[derive(Debug, Clone)]
pub struct TargetUrl {
    pub config: Config,
    /// `host:port/dbname`, for logs, metrics and `/stats`.
    pub label: String,
}

impl TargetUrl {
    pub fn parse(url: &str) -> Result<TargetUrl, String> {
        let config: Config = url.parse().map_err(|e| {
            format!("not a PostgreSQL connection URL ({e}): write postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME")
        })?;
        if config.get_hosts().is_empty() {
            return Err("the URL names no host: write postgresql://USER@HOST[:PORT]/DBNAME".into());
        }
        let host = match &config.get_hosts()[0] {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let db = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres");
        Ok(TargetUrl {
            label: format!("{host}:{port}/{db}"),
            config,
        })
    }
}

/// A target while the shipper runs.
pub struct Target {
    pub url: TargetUrl,
    /// The instance name shipped under and the history's owner id that claims it.
    instance: String,
    owner: i64,
    pub breaker: Breaker,
    client: Option<Client>,
    /// Days whose partitions this connection has made sure of.
    partitioned: BTreeSet<i64>,
}

impl Target {
    pub fn new(url: TargetUrl, instance: &str, owner: i64) -> Target {
        Target {
            url,
            instance: instance.to_string(),
            owner,
            breaker: Breaker::new(BREAKER_THRESHOLD, BREAKER_PAUSE),
            client: None,
            partitioned: BTreeSet::new(),
        }
    }

    /// The open connection, or a new one (migrated) within `timeout`.
    pub fn client(&mut self, timeout: Duration) -> Result<&mut Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.disconnect();
        }
        if self.client.is_none() {
            let mut config = self.url.config.clone();
            config
                .connect_timeout(timeout.max(Duration::from_millis(100)))
                .tcp_user_timeout(Duration::from_secs(10))
                .keepalives_idle(Duration::from_secs(10))
                .application_name("ricochet")
                // A hung server must not hold the shipper (or the stop deadline) for long.
                .options("-c statement_timeout=10000 -c lock_timeout=5000 -c client_min_messages=warning");
            let mut client = config
                .connect(NoTls)
                .with_context(|| format!("cannot connect to {}", self.url.label))?;
            schema::migrate(&mut client)
                .with_context(|| format!("cannot migrate the schema on {}", self.url.label))?;
            schema::claim(&mut client, &self.instance, self.owner)
                .with_context(|| format!("{} refused the batch", self.url.label))?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    pub fn disconnect(&mut self) {
        self.client = None;
        self.partitioned.clear();
    }

    /// A health check: connected (or connecting) and answering.
    pub fn check(&mut self, timeout: Duration) -> Result<()> {
        let label = self.url.label.clone();
        let result = self
            .client(timeout)
            .and_then(|c| Ok(c.simple_query("SELECT 1")?))
            .with_context(|| format!("{label} failed its health check"));
        if result.is_err() {
            self.disconnect();
        }
        result.map(|_| ())
    }

    /// Upserts `batch` for `instance` and rewrites the minutes it touches, in one transaction.
    /// Keyed by (instance, second) and overwriting, so shipping a batch twice changes nothing.
    pub fn ship(&mut self, batch: &[Waiting], timeout: Duration) -> Result<()> {
        let result = self.try_ship(batch, timeout);
        if result.is_err() {
            self.disconnect();
        }
        result
    }

    fn try_ship(&mut self, batch: &[Waiting], timeout: Duration) -> Result<()> {
        let days: BTreeSet<i64> = batch
            .iter()
            .map(|w| schema::day_of(w.record.second))
            .collect();
        let missing: Vec<i64> = days.difference(&self.partitioned).copied().collect();
        let instance = self.instance.clone();
        let client = self.client(timeout)?;
        if !missing.is_empty() {
            schema::ensure_partitions(client, &missing)?;
        }
        let columns = Columns::of(batch);
        // One statement: its own transaction.
        client
            .execute(ship_sql(), &columns.params(&instance.as_str()))
            .with_context(|| format!("{} did not take the batch", self.url.label))?;
        self.partitioned.extend(missing);
        Ok(())
    }
}

/// A batch as one array per column (unnest turns them back into rows: one statement per batch).
struct Columns {
    seconds: Vec<f64>,
    increments: Vec<String>,
    counts: Vec<Vec<i64>>,
}

impl Columns {
    fn of(batch: &[Waiting]) -> Columns {
        let mut counts: Vec<Vec<i64>> = (0..2 + crate::stats::DropReason::COUNT)
            .map(|_| Vec::with_capacity(batch.len()))
            .collect();
        for w in batch {
            let r = &w.record;
            let values = [r.requests, r.replies].into_iter().chain(r.drops);
            for (column, value) in counts.iter_mut().zip(values) {
                column.push(i64::try_from(value).unwrap_or(i64::MAX));
            }
        }
        Columns {
            seconds: batch.iter().map(|w| w.record.second as f64).collect(),
            increments: batch
                .iter()
                .map(|w| w.record.increments.to_string())
                .collect(),
            counts,
        }
    }

    fn params<'a>(&'a self, instance: &'a &'a str) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> =
            vec![instance, &self.seconds, &self.increments];
        params.extend(
            self.counts
                .iter()
                .map(|c| c as &(dyn postgres::types::ToSql + Sync)),
        );
        params
    }
}

/// One statement per batch: the rows are upserted keyed by (instance, second), overwriting, and
/// each touched minute of the rollup gains the difference between the new rows and the rows they
/// replaced (read from the same snapshot). A replayed batch changes nothing; a minute whose older
/// seconds were dropped by retention keeps them.
fn ship_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let columns = schema::counted_columns();
        let counts = &columns[1..];
        let arrays: Vec<String> = (0..counts.len())
            .map(|i| format!("${}::int8[]", i + 4))
            .collect();
        let overwrite: Vec<String> = columns.iter().map(|c| format!("{c} = excluded.{c}")).collect();
        let deltas: Vec<String> = columns
            .iter()
            .map(|c| format!("sum(up.{c} - coalesce(old.{c}, 0))"))
            .collect();
        let add: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} = ricochet_minutes.{c} + excluded.{c}"))
            .collect();
        format!(
            "WITH new AS (
                 SELECT to_timestamp(s) AS second, i::numeric AS increments, {counts}
                   FROM unnest($2::float8[], $3::text[], {arrays}) AS t(s, i, {counts})),
             old AS (
                 SELECT o.second, {old_cols} FROM ricochet_seconds o
                  WHERE o.instance = $1 AND o.second IN (SELECT second FROM new)),
             up AS (
                 INSERT INTO ricochet_seconds (instance, second, {cols})
                 SELECT $1, second, {cols} FROM new
                 ON CONFLICT (instance, second) DO UPDATE SET {overwrite}
                 RETURNING second, {cols})
             INSERT INTO ricochet_minutes (instance, minute, seconds, {cols})
             SELECT $1, date_trunc('minute', up.second, 'UTC'), count(*) FILTER (WHERE old.second IS NULL), {deltas}
               FROM up LEFT JOIN old ON old.second = up.second
              GROUP BY 2
             ON CONFLICT (instance, minute) DO UPDATE
                SET seconds = ricochet_minutes.seconds + excluded.seconds, {add}",
            counts = counts.join(", "),
            arrays = arrays.join(", "),
            old_cols = columns.iter().map(|c| format!("o.{c}")).collect::<Vec<_>>().join(", "),
            cols = columns.join(", "),
            overwrite = overwrite.join(", "),
            deltas = deltas.join(", "),
            add = add.join(", "),
        )
    })
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn urls_are_checked_and_labelled_without_the_password() {
        let t = TargetUrl::parse("postgresql://fleet:s3cret@db.example:6432/metrics").unwrap();
        assert_eq!(t.label, "db.example:6432/metrics");
        assert!(!t.label.contains("s3cret"));
        let e = TargetUrl::parse("mysql://x").unwrap_err();
        assert!(e.contains("postgresql://"), "{e}");
    }
}
