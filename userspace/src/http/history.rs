//! GET /summary (the per-second history of `--state-dir`) and the fleet shipper's metrics.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::routes::{register_field, Body, Response};
use super::state::AppState;
use crate::history::{format_time, parse_time, unix_now, Second, Totals};
use crate::stats::{Field, FieldKind};

/// The most seconds one `series=1` answer lists.
pub const MAX_SERIES: i64 = 86_400;

/// What GET /summary answers.
#[derive(Debug, serde::Serialize)]
struct Summary<'a> {
    instance: &'a str,
    from: String,
    to: String,
    total: Totals,
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<Vec<Second>>,
}

/// The query: `from` and `to` (Unix seconds or RFC 3339, `to` exclusive) and `series=1`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Query {
    from: Option<i64>,
    to: Option<i64>,
    series: bool,
}

fn parse_query(query: &str) -> Result<Query, String> {
    let mut q = Query::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("'{key}' is not UTF-8 once percent-decoded"))?;
        match key {
            "from" => q.from = Some(parse_time(&value)?),
            "to" => q.to = Some(parse_time(&value)?),
            "series" => q.series = matches!(&*value, "1" | "true" | ""),
            _ => {
                return Err(format!(
                    "unknown parameter '{key}': use from, to and series"
                ))
            }
        }
    }
    Ok(q)
}

/// GET /summary?from=T&to=T[&series=1].
pub fn summary(query: &str, state: &AppState) -> Response {
    let Some(history) = &state.history else {
        return Response::error(404, "no history: /summary needs serve --state-dir");
    };
    let q = match parse_query(query) {
        Ok(q) => q,
        Err(e) => return Response::error(400, &e),
    };
    // One summary at a time: another HTTP worker never waits behind a long one (and with it every
    // connection it serves).
    let store = match history.store.try_lock() {
        Ok(store) => store,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            return Response::error(503, "another /summary is being computed: retry shortly")
        }
    };
    let to = q.to.unwrap_or_else(|| unix_now() + 1);
    let from = match q.from {
        Some(from) if from > to => {
            return Response::error(400, "from is after to: give from <= to")
        }
        Some(from) => from,
        None => match store.first_second() {
            // A series without `from` lists the last day at most.
            Ok(first) if q.series => first.unwrap_or(to).clamp(to - MAX_SERIES, to),
            Ok(first) => first.unwrap_or(to).min(to),
            Err(e) => return Response::error(500, &format!("cannot read the history: {e:#}")),
        },
    };
    if q.series && to.saturating_sub(from) > MAX_SERIES {
        return Response::error(
            400,
            "series=1 lists at most 86400 seconds: narrow from and to",
        );
    }
    let (total, seconds) = match store.summary(from, to, q.series) {
        Ok(found) => found,
        Err(e) => return Response::error(500, &format!("cannot read the history: {e:#}")),
    };
    drop(store);
    let body = Summary {
        instance: &history.instance,
        from: format_time(from),
        to: format_time(to),
        total,
        seconds: q.series.then_some(seconds),
    };
    match serde_json::to_vec(&body) {
        Ok(bytes) => Response::new(200, "application/json", Body::Owned(bytes)),
        Err(e) => Response::error(500, &format!("cannot encode the summary: {e}")),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

/// The history recorder's failures, with `--state-dir`.
pub fn register_history(registry: &mut Registry, state: &AppState) {
    if let Some(history) = &state.history {
        let failures = Field {
            name: "history_write_failures",
            help:
                "Per-second records the history store refused (kept and added to the next second's)",
            kind: FieldKind::Counter,
            value: history.write_failures.load(Ordering::Relaxed),
        };
        register_field(registry, &failures);
    }
}

/// The fleet shipper's metrics, with `--fleet`.
pub fn register_fleet(registry: &mut Registry, state: &AppState) {
    let Some(fleet) = &state.fleet else {
        return;
    };
    let up = Family::<TargetLabel, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
    let breaker = Family::<TargetLabel, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
    for target in &fleet.targets {
        let label = TargetLabel {
            target: target.label.clone(),
        };
        up.get_or_create(&label)
            .set(i64::from(target.up.load(Ordering::Relaxed)));
        breaker
            .get_or_create(&label)
            .set(i64::from(target.breaker().code()));
    }
    registry.register(
        "fleet_up",
        "Whether the fleet target answered its last check or batch",
        up,
    );
    registry.register(
        "fleet_breaker_state",
        "The fleet target's circuit breaker: 0 closed, 1 half-open, 2 open",
        breaker,
    );
    for field in fleet.fields() {
        register_field(registry, &field);
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_query_takes_unix_seconds_rfc3339_and_series() {
        assert_eq!(parse_query(""), Ok(Query::default()));
        let q = parse_query("from=100&to=2025-12-04T16%3A00%3A00Z&series=1").unwrap();
        assert_eq!(
            q,
            Query {
                from: Some(100),
                to: Some(1_764_864_000),
                series: true
            }
        );
        assert!(parse_query("from=soon").unwrap_err().contains("RFC 3339"));
        assert!(parse_query("since=1")
            .unwrap_err()
            .contains("unknown parameter"));
    }
}
