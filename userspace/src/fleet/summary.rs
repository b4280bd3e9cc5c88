//! `ricochet fleet summary`: totals per instance and for the fleet over a time range, straight
//! from PostgreSQL. Whole minutes are read from the per-minute rollup (a month partition per month
//! the range touches); only the partial minutes at either end come from the per-second table (the
//! day partitions they touch). Bounds are literals, so the planner prunes partitions itself: a
//! one-hour summary on whole minutes reads one partition.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use postgres::{GenericClient, NoTls};

use super::schema::{self, counted_columns};
use super::target::TargetUrl;
use crate::history::{format_time, parse_time, unix_now, Totals};
use crate::stats::DropReason;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum FleetCommand {
    /// Totals per instance and for the fleet, from the fleet database.
    Summary(SummaryArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct SummaryArgs {
    /// PostgreSQL connection URL; repeat for fallbacks, tried in order until one answers.
    #[arg(long, value_name = "URL", required = true)]
    pub fleet: Vec<String>,
    /// Start of the range (inclusive): Unix seconds or RFC 3339. Default: the first record.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub from: Option<i64>,
    /// End of the range (exclusive): Unix seconds or RFC 3339. Default: now.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub to: Option<i64>,
    /// Print JSON: {"from", "to", "total": {...}, "instances": {"NAME": {...}}}.
    #[arg(long)]
    pub json: bool,
}

/// Which table a part of the range is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Seconds,
    Minutes,
}

/// One part of a range: `from <= t < to` in one table (`from` None: from the beginning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub table: Table,
    pub from: Option<i64>,
    pub to: i64,
}

/// Splits `[from, to)` into the pieces to read (sans-IO): whole minutes from the rollup, the
/// partial minutes at the ends from the seconds.
pub fn plan(from: Option<i64>, to: i64) -> Vec<Piece> {
    let piece = |table, from, to| Piece { table, from, to };
    let whole_to = to.div_euclid(60) * 60;
    let Some(f) = from else {
        let mut pieces = vec![piece(Table::Minutes, None, whole_to)];
        if to > whole_to {
            pieces.push(piece(Table::Seconds, Some(whole_to), to));
        }
        return pieces;
    };
    let whole_from = -((-f).div_euclid(60)) * 60;
    if f >= to {
        return Vec::new();
    }
    if whole_from >= whole_to {
        // Within one minute, or across one minute boundary: seconds only.
        return vec![piece(Table::Seconds, Some(f), to)];
    }
    let mut pieces = Vec::new();
    if whole_from > f {
        pieces.push(piece(Table::Seconds, Some(f), whole_from));
    }
    pieces.push(piece(Table::Minutes, Some(whole_from), whole_to));
    if to > whole_to {
        pieces.push(piece(Table::Seconds, Some(whole_to), to));
    }
    pieces
}

/// The query of one piece. The bounds are literals, so the planner prunes partitions itself.
pub fn piece_sql(piece: &Piece) -> String {
    let (table, column) = match piece.table {
        Table::Seconds => ("ricochet_seconds", "second"),
        Table::Minutes => ("ricochet_minutes", "minute"),
    };
    let sums: Vec<String> = counted_columns()
        .iter()
        .map(|c| format!("coalesce(sum({c}), 0)::text"))
        .collect();
    let lower = piece.from.map_or(String::new(), |f| {
        format!("{column} >= '{}'::timestamptz AND ", format_time(f))
    });
    format!(
        "SELECT instance, {} FROM {table} WHERE {lower}{column} < '{}'::timestamptz GROUP BY instance",
        sums.join(", "),
        format_time(piece.to)
    )
}

/// A fleet summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FleetSummary {
    pub from: Option<String>,
    pub to: String,
    pub total: Totals,
    pub instances: BTreeMap<String, Totals>,
}

/// Sums `[from, to)` (to defaults to now) per instance and for the fleet.
pub fn query(
    client: &mut impl GenericClient,
    from: Option<i64>,
    to: Option<i64>,
) -> Result<FleetSummary> {
    let to = to.unwrap_or_else(|| unix_now() + 1);
    let tables: bool = client
        .query_one("SELECT to_regclass('ricochet_minutes') IS NOT NULL", &[])?
        .get(0);
    if !tables {
        bail!("this database has no ricochet tables: no instance has shipped to it yet (is it the --fleet database?)");
    }
    let mut summary = FleetSummary {
        from: from.map(format_time),
        to: format_time(to),
        ..FleetSummary::default()
    };
    for piece in plan(from, to) {
        if piece.table == Table::Seconds {
            check_seconds_kept(client, &piece)?;
        }
        for row in client.query(piece_sql(&piece).as_str(), &[])? {
            let instance: String = row.get(0);
            let sums: Vec<String> = (1..row.len()).map(|i| row.get(i)).collect();
            let part = totals_of(&sums)?;
            summary.instances.entry(instance).or_default().merge(&part);
            summary.total.merge(&part);
        }
    }
    Ok(summary)
}

/// A partial minute needs its seconds: refuses one whose day partition retention dropped while the
/// rollup still holds its minute (the answer would be short).
fn check_seconds_kept(client: &mut impl GenericClient, piece: &Piece) -> Result<()> {
    let from = piece.from.unwrap_or(piece.to);
    for day in schema::day_of(from)..=schema::day_of(piece.to - 1) {
        let (name, _, _) = schema::second_partition(day)?;
        let kept: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])?
            .get(0);
        let minute = from.div_euclid(60) * 60;
        let sql = format!(
            "SELECT count(*) FROM ricochet_minutes WHERE minute >= '{}'::timestamptz AND minute < '{}'::timestamptz",
            format_time(minute),
            format_time(piece.to)
        );
        if !kept && client.query_one(sql.as_str(), &[])?.get::<_, i64>(0) > 0 {
            bail!("the seconds from {} to {} are past the per-second retention (--fleet-retention); only whole minutes remain: give --from and --to on whole minutes", format_time(from), format_time(piece.to));
        }
    }
    Ok(())
}

fn totals_of(sums: &[String]) -> Result<Totals> {
    let number = |i: usize| -> Result<u64> {
        sums[i]
            .parse()
            .with_context(|| format!("a sum out of range: {}", sums[i]))
    };
    let mut totals = Totals {
        increments: sums[0].parse().context("increments out of range")?,
        requests: number(1)?,
        replies: number(2)?,
        ..Totals::default()
    };
    for reason in DropReason::ALL {
        totals.drops[reason.index()] = number(3 + reason.index())?;
    }
    Ok(totals)
}

/// Connects to the first of `urls` that answers.
pub fn connect_any(urls: &[String]) -> Result<postgres::Client> {
    let mut errors = Vec::new();
    for url in urls {
        let target = TargetUrl::parse(url).map_err(anyhow::Error::msg)?;
        let mut config = target.config.clone();
        config
            .connect_timeout(Duration::from_secs(5))
            .options("-c statement_timeout=60000");
        match config.connect(NoTls) {
            Ok(client) => return Ok(client),
            Err(e) => errors.push(format!("{}: {e}", target.label)),
        }
    }
    bail!("no --fleet database answered: {}", errors.join("; "))
}

/// `ricochet fleet ...`.
pub fn run(command: FleetCommand) -> Result<()> {
    let FleetCommand::Summary(args) = command;
    let mut client = connect_any(&args.fleet)?;
    let summary = query(&mut client, args.from, args.to)?;
    let text = if args.json {
        serde_json::to_string_pretty(&summary)? + "\n"
    } else {
        render(&summary)
    };
    let mut out = std::io::stdout().lock();
    std::io::Write::write_all(&mut out, text.as_bytes())?;
    Ok(())
}

fn render(summary: &FleetSummary) -> String {
    use std::fmt::Write;
    let from = summary.from.as_deref().unwrap_or("the first record");
    let mut out = format!("fleet summary from {from} to {}\n", summary.to);
    let _ = writeln!(
        out,
        "{:<24} {:>22} {:>14} {:>14} {:>10}",
        "instance", "increments", "requests", "replies", "drops"
    );
    let line = |name: &str, t: &Totals| {
        format!(
            "{:<24} {:>22} {:>14} {:>14} {:>10}\n",
            name,
            t.increments,
            t.requests,
            t.replies,
            t.drops.iter().sum::<u64>()
        )
    };
    for (name, totals) in &summary.instances {
        out += &line(name, totals);
    }
    out += &line("fleet", &summary.total);
    out
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn whole_minutes_come_from_the_rollup_and_partial_ones_from_the_seconds() {
        let piece = |table, from, to| Piece { table, from, to };
        let (s, m) = (Table::Seconds, Table::Minutes);
        assert_eq!(plan(Some(3600), 7200), [piece(m, Some(3600), 7200)]);
        assert_eq!(
            plan(Some(30), 86_400 + 90),
            [
                piece(s, Some(30), 60),
                piece(m, Some(60), 86_400 + 60),
                piece(s, Some(86_400 + 60), 86_400 + 90)
            ]
        );
        assert_eq!(plan(Some(10), 50), [piece(s, Some(10), 50)]);
        assert_eq!(plan(Some(50), 70), [piece(s, Some(50), 70)]);
        assert_eq!(plan(Some(-90), -30), [piece(s, Some(-90), -30)]);
        assert_eq!(
            plan(None, 610),
            [piece(m, None, 600), piece(s, Some(600), 610)]
        );
        assert!(plan(Some(10), 10).is_empty());
    }

    #[test]
    fn piece_queries_bound_the_partition_key_with_literals() {
        let sql = piece_sql(&Piece {
            table: Table::Seconds,
            from: Some(1_764_864_000),
            to: 1_764_867_600,
        });
        assert!(
            sql.contains("second >= '2025-12-04T16:00:00Z'::timestamptz"),
            "{sql}"
        );
        assert!(
            sql.contains("second < '2025-12-04T17:00:00Z'::timestamptz"),
            "{sql}"
        );
        assert!(sql.contains("sum(drop_bad_descriptor)"));
    }
}
