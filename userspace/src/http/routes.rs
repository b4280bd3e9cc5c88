//! The endpoints, sans-IO: a parsed request in, a response out. The server (server.rs) does the I/O.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry, Unit};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::request::Head;
use super::state::{AppState, RouteLabel, RouteStatus};
use crate::core::{Batch, Protocol};
use crate::stats::{DropReason, Field, FieldKind, StatsSnapshot, XskStats};
use crate::wire::{CounterRepr, FRAME_LEN};

/// The dashboard page, embedded in the binary.
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// A request as the router needs it: the parsed head and body, and who sent it.
#[derive(Debug)]
pub struct Request<'a> {
    pub head: Head<'a>,
    /// Whether the client connected from loopback or a Unix socket.
    pub local_peer: bool,
}

/// A response body: static bytes or built for this request.
#[derive(Debug)]
pub enum Body {
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl Body {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Body::Static(b) => b,
            Body::Owned(v) => v,
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Body,
    /// An extra header line (without CRLF), e.g. `Allow: GET`.
    pub extra_header: Option<&'static str>,
}

impl Response {
    pub(super) fn new(status: u16, content_type: &'static str, body: Body) -> Response {
        Response {
            status,
            content_type,
            body,
            extra_header: None,
        }
    }

    pub fn json(status: u16, value: serde_json::Value) -> Response {
        let mut body = serde_json::to_vec(&value).expect("JSON values serialize");
        body.push(b'\n');
        Response::new(status, "application/json", Body::Owned(body))
    }

    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, json!({ "error": message }))
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The route label a path is counted under (bounded: unknown paths are `other`).
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/counter" => "/counter",
        "/stats" => "/stats",
        "/summary" => "/summary",
        "/debug/pprof/profile" => "/debug/pprof/profile",
        _ => "other",
    }
}

/// Who may call the privileged endpoints (POST /counter, /debug/pprof/*).
#[derive(Debug, Clone)]
pub struct Access {
    /// The bearer token; None when the server listens on loopback or a Unix socket only.
    pub token: Option<String>,
}

impl Access {
    /// Checks `Authorization: Bearer TOKEN` in constant time.
    pub fn allows(&self, req: &Request) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(given) = req
            .head
            .authorization
            .and_then(|h| h.strip_prefix("Bearer "))
        else {
            return false;
        };
        given.as_bytes().ct_eq(token.as_bytes()).into()
    }
}

fn unauthorized() -> Response {
    let mut r = Response::error(
        401,
        "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'",
    );
    r.extra_header = Some("WWW-Authenticate: Bearer");
    r
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut r = Response::error(405, "method not allowed");
    r.extra_header = Some(allow);
    r
}

/// What the server must do for a request the router does not answer itself.
pub enum Routed {
    Respond(Response),
    /// Run a CPU profile for this many seconds; `flamegraph` asks for SVG instead of pprof protobuf.
    Profile {
        seconds: u64,
        flamegraph: bool,
    },
}

/// Routes one request.
pub fn route(req: &Request, state: &AppState, access: &Access) -> Routed {
    let response = match req.head.path {
        "/" => match req.head.method {
            "GET" | "HEAD" => Response::new(
                200,
                "text/html; charset=utf-8",
                Body::Static(DASHBOARD.as_bytes()),
            ),
            _ => method_not_allowed("Allow: GET, HEAD"),
        },
        "/healthz" => match req.head.method {
            "GET" | "HEAD" => {
                Response::new(200, "text/plain; charset=utf-8", Body::Static(b"ok\n"))
            }
            _ => method_not_allowed("Allow: GET, HEAD"),
        },
        "/readyz" => match req.head.method {
            "GET" | "HEAD" => match state.readiness.reason() {
                None => Response::json(200, json!({ "ready": true })),
                Some(reason) => Response::json(503, json!({ "ready": false, "reason": reason })),
            },
            _ => method_not_allowed("Allow: GET, HEAD"),
        },
        "/metrics" => match req.head.method {
            "GET" | "HEAD" => Response::new(
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                Body::Owned(metrics_text(state).into_bytes()),
            ),
            _ => method_not_allowed("Allow: GET, HEAD"),
        },
        "/stats" => match req.head.method {
            "GET" | "HEAD" => Response::json(200, stats_json(state)),
            _ => method_not_allowed("Allow: GET, HEAD"),
        },
        "/counter" => match req.head.method {
            "GET" | "HEAD" => Response::json(200, json!({ "value": state.counter.load() })),
            "POST" if !access.allows(req) => unauthorized(),
            "POST" => post_counter(req, state),
            _ => method_not_allowed("Allow: GET, HEAD, POST"),
        },
        "/summary" => match req.head.method {
            "GET" | "HEAD" => super::history::summary(req.head.query, state),
            _ => method_not_allowed("Allow: GET, HEAD"),
        },
        "/debug/pprof/profile" => match req.head.method {
            "GET" if !access.allows(req) => unauthorized(),
            "GET" => return profile_request(req.head.query),
            _ => method_not_allowed("Allow: GET"),
        },
        _ => Response::error(
            404,
            "no such endpoint: try /, /healthz, /readyz, /metrics, /counter, /stats, /summary",
        ),
    };
    Routed::Respond(response)
}

const MAX_PROFILE_SECONDS: u64 = 60;

fn profile_request(query: &str) -> Routed {
    let mut seconds = 30;
    let mut flamegraph = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "seconds" => match value.parse::<u64>() {
                Ok(n) if (1..=MAX_PROFILE_SECONDS).contains(&n) => seconds = n,
                _ => {
                    return Routed::Respond(Response::error(
                        400,
                        "seconds must be a whole number from 1 to 60",
                    ))
                }
            },
            "format" => match value {
                "flamegraph" => flamegraph = true,
                "pprof" | "proto" => flamegraph = false,
                _ => {
                    return Routed::Respond(Response::error(
                        400,
                        "format must be pprof or flamegraph",
                    ))
                }
            },
            _ => {}
        }
    }
    Routed::Profile {
        seconds,
        flamegraph,
    }
}

/// POST /counter: a JSON body `{"increment": N}` or the 16-byte binary frame.
fn post_counter(req: &Request, state: &AppState) -> Response {
    let content_type = req
        .head
        .content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    match content_type {
        "application/octet-stream" => {
            if req.head.body.len() != FRAME_LEN {
                state.http_counter_stats.count_drop(DropReason::WrongLength);
                return Response::error(400, "a binary counter frame is exactly 16 bytes");
            }
            let mut batch = Batch::new(&state.http_counter_stats);
            let ticket = batch.admit(Protocol::Counter, req.head.body);
            let commit = batch.commit(&*state.counter);
            let mut reply = [0u8; FRAME_LEN];
            if commit.write_reply(ticket, req.head.body, &mut reply) != FRAME_LEN {
                return Response::error(400, "the frame's hash does not match its value");
            }
            state.http_counter_stats.replies.add(1);
            Response::new(200, "application/octet-stream", Body::Owned(reply.to_vec()))
        }
        "application/json" | "" => {
            let increment = serde_json::from_slice::<serde_json::Value>(req.head.body)
                .ok()
                .and_then(|v| v.get("increment").and_then(|i| i.as_u64()));
            let Some(increment) = increment else {
                state.http_counter_stats.count_drop(DropReason::WrongLength);
                return Response::error(400, "expected a JSON body {\"increment\": N} with N a whole number from 0 to 2^64-1");
            };
            // The same path as a datagram: a batch of one, one atomic add.
            let frame = CounterRepr { value: increment }.to_bytes();
            let mut batch = Batch::new(&state.http_counter_stats);
            let ticket = batch.admit(Protocol::Counter, &frame);
            let commit = batch.commit(&*state.counter);
            let value = match ticket {
                crate::core::Ticket::Counter { prefix } => commit.value(prefix),
                _ => unreachable!("a frame built from a value is valid"),
            };
            state.http_counter_stats.replies.add(1);
            Response::json(200, json!({ "value": value, "increment": increment }))
        }
        _ => Response::error(415, "send application/json ({\"increment\": N}) or application/octet-stream (16-byte frame)"),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    datapath: &'static str,
    worker: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    datapath: &'static str,
    worker: u32,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XskLabels {
    queue: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XdpLabels {
    counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    mode: &'static str,
}

/// One metric family per field of a statistics record, counter or gauge as the field says.
enum FieldFamily<L> {
    Counter(Family<L, PromCounter>),
    Gauge(Family<L, Gauge<u64, AtomicU64>>),
}

impl<L> FieldFamily<L>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    fn new(kind: FieldKind) -> FieldFamily<L> {
        match kind {
            FieldKind::Counter => FieldFamily::Counter(Family::default()),
            FieldKind::Gauge => FieldFamily::Gauge(Family::default()),
        }
    }

    fn add(&self, labels: &L, value: u64) {
        match self {
            FieldFamily::Counter(f) => {
                f.get_or_create(labels).inc_by(value);
            }
            FieldFamily::Gauge(f) => {
                f.get_or_create(labels).inc_by(value);
            }
        }
    }

    fn register(self, registry: &mut Registry, name: &str, help: &str) {
        match self {
            FieldFamily::Counter(f) => register_named(registry, name, help, f),
            FieldFamily::Gauge(f) => register_named(registry, name, help, f),
        }
    }
}

/// Registers `metric` under `name`; a name ending in `_bytes` gets the OpenMetrics unit.
fn register_named(registry: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    if let Some(base) = name.strip_suffix("_bytes") {
        registry.register_with_unit(base, help, Unit::Bytes, metric)
    } else if let Some(base) = name.strip_suffix("_seconds") {
        registry.register_with_unit(base, help, Unit::Seconds, metric)
    } else {
        registry.register(name, help, metric)
    }
}

/// Registers one statistic without labels.
pub(super) fn register_field(registry: &mut Registry, field: &Field) {
    match field.kind {
        FieldKind::Counter => {
            let metric = PromCounter::<u64>::default();
            metric.inc_by(field.value);
            register_named(registry, field.name, field.help, metric);
        }
        FieldKind::Gauge => {
            let metric = Gauge::<u64, AtomicU64>::default();
            metric.set(field.value);
            register_named(registry, field.name, field.help, metric);
        }
    }
}

/// The worker records (every field of [`StatsSnapshot::fields`] and every drop reason), one
/// sample per worker, registered on `registry`.
fn register_worker_records(registry: &mut Registry, state: &AppState) {
    let described = StatsSnapshot::default().fields();
    let families: Vec<FieldFamily<WorkerLabels>> =
        described.iter().map(|f| FieldFamily::new(f.kind)).collect();
    let drops = Family::<DropLabels, PromCounter>::default();
    let record = |datapath: &'static str, worker: u32, s: &StatsSnapshot| {
        let labels = WorkerLabels { datapath, worker };
        for (field, family) in s.fields().iter().zip(&families) {
            family.add(&labels, field.value);
        }
        for reason in DropReason::ALL {
            let labels = DropLabels {
                datapath,
                worker,
                reason: reason.as_str(),
            };
            drops.get_or_create(&labels).inc_by(s.drops(reason));
        }
    };
    for w in state.workers.iter() {
        record(w.datapath, w.id, &w.stats.snapshot());
    }
    record("http", 0, &state.http_counter_stats.snapshot());
    for (field, family) in described.iter().zip(families) {
        family.register(registry, field.name, field.help);
    }
    registry.register("drops", "Requests dropped, by reason", drops);
}

/// The AF_XDP socket records (every field of [`XskStats::fields`]) and their age, per queue.
fn register_xsk_records(registry: &mut Registry, state: &AppState) {
    let described = XskStats::default().fields();
    let families: Vec<FieldFamily<XskLabels>> =
        described.iter().map(|f| FieldFamily::new(f.kind)).collect();
    let age = Family::<XskLabels, Gauge<f64, AtomicU64>>::default();
    for w in &state.workers {
        let Some(live) = &w.xsk else { continue };
        let labels = XskLabels { queue: w.id };
        for (field, family) in live.snapshot().fields().iter().zip(&families) {
            family.add(&labels, field.value);
        }
        if let Some(published) = live.age() {
            age.get_or_create(&labels).set(published.as_secs_f64());
        }
    }
    for (field, family) in described.iter().zip(families) {
        family.register(registry, &format!("xsk_{}", field.name), field.help);
    }
    registry.register_with_unit(
        "xsk_stats_age",
        "Time since the AF_XDP worker last refreshed its XDP_STATISTICS",
        Unit::Seconds,
        age,
    );
}

/// The XDP program's counters, summed over CPUs, if one is loaded (serve hands in a reader).
fn register_xdp_program(registry: &mut Registry, state: &AppState) {
    let Some(values) = state.xdp_stats.as_ref().and_then(|reader| reader()) else {
        return;
    };
    let family = Family::<XdpLabels, PromCounter>::default();
    for (name, value) in values {
        family
            .get_or_create(&XdpLabels { counter: name })
            .inc_by(value);
    }
    registry.register(
        "xdp_program",
        "The XDP program's per-CPU counters, summed over CPUs",
        family,
    );
}

/// The counter, uptime, build information and the HTTP server's own request metrics.
fn register_process(registry: &mut Registry, state: &AppState) {
    let counter = Gauge::<u64, AtomicU64>::default();
    counter.set(state.counter.load());
    registry.register("counter", "The global counter", counter);
    let uptime = Gauge::<f64, AtomicU64>::default();
    uptime.set(state.started.elapsed().as_secs_f64());
    registry.register_with_unit("uptime", "Time since start", Unit::Seconds, uptime);
    let build = Info::new(BuildLabels {
        version: env!("CARGO_PKG_VERSION"),
        mode: state.mode,
    });
    registry.register("build", "Build information", build);
    registry.register(
        "http_requests",
        "HTTP requests by route and status",
        state.http.requests.clone(),
    );
    registry.register_with_unit(
        "http_request_duration",
        "HTTP request handling time",
        Unit::Seconds,
        state.http.latency.clone(),
    );
}

/// The Prometheus (OpenMetrics) exposition, built from lock-free reads of the statistics records;
/// each record's metrics come from its own field list, as `/stats` and the exit report do.
pub fn metrics_text(state: &AppState) -> String {
    let mut registry = Registry::with_prefix("ricochet");
    register_worker_records(&mut registry, state);
    register_xsk_records(&mut registry, state);
    for field in state.http_conns.fields() {
        register_field(&mut registry, &field);
    }
    register_xdp_program(&mut registry, state);
    super::history::register_history(&mut registry, state);
    super::history::register_fleet(&mut registry, state);
    register_process(&mut registry, state);
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// Described fields as a JSON object, `name: value`.
fn fields_json(fields: &[Field]) -> serde_json::Map<String, serde_json::Value> {
    fields
        .iter()
        .map(|f| (f.name.to_string(), json!(f.value)))
        .collect()
}

/// A worker record as JSON: every field of [`StatsSnapshot::fields`], and `drops` by reason.
fn record_json(s: &StatsSnapshot) -> serde_json::Map<String, serde_json::Value> {
    let mut record = fields_json(&s.fields());
    let drops: serde_json::Map<String, serde_json::Value> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), json!(s.drops(*r))))
        .collect();
    record.insert("drops".into(), serde_json::Value::Object(drops));
    record
}

/// /stats: configuration, mode, what started (fallbacks taken), uptime and every statistic in /metrics, as JSON.
pub fn stats_json(state: &AppState) -> serde_json::Value {
    let workers: Vec<serde_json::Value> = state
        .workers
        .iter()
        .map(|w| {
            let mut v = serde_json::Map::new();
            v.insert("datapath".into(), json!(w.datapath));
            v.insert("id".into(), json!(w.id));
            v.insert("cpu".into(), json!(w.cpu.0));
            v.extend(record_json(&w.stats.snapshot()));
            if let Some(live) = &w.xsk {
                let mut xsk = fields_json(&live.snapshot().fields());
                xsk.insert("age_s".into(), json!(live.age().map(|a| a.as_secs_f64())));
                v.insert("xsk".into(), serde_json::Value::Object(xsk));
            }
            serde_json::Value::Object(v)
        })
        .collect();
    let http = fields_json(&state.http_conns.fields());
    let xdp = state
        .xdp_stats
        .as_ref()
        .and_then(|reader| reader())
        .map(|values| {
            serde_json::Value::Object(
                values
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect(),
            )
        });
    json!({
        "mode": state.mode,
        "started_as": state.started_as,
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "counter": state.counter.load(),
        "ready": state.readiness.reason().is_none(),
        "workers": workers,
        "http_counter": record_json(&state.http_counter_stats.snapshot()),
        "http": http,
        "xdp": xdp,
        "fleet": state.fleet.as_ref().map(|f| f.to_json()),
        "config": state.config,
        "workers_running": state.readiness.workers_running.load(Ordering::Relaxed),
        // Everything in /metrics, HTTP request counts and latency histograms included.
        "metrics": metrics_text(state),
    })
}

/// Records one handled HTTP request in the server's metrics (slow path: a family lookup).
pub fn observe(state: &AppState, route: &'static str, status: u16, seconds: f64) {
    state
        .http
        .requests
        .get_or_create(&RouteStatus { route, status })
        .inc();
    state
        .http
        .latency
        .get_or_create(&RouteLabel {
            route,
            worker: u32::MAX,
        })
        .observe(seconds);
}

/// One HTTP worker's handles to its metrics, so a request costs an atomic add and an uncontended
/// lock instead of a family lookup.
pub struct MetricsCache {
    worker: u32,
    requests: Vec<(
        &'static str,
        u16,
        prometheus_client::metrics::counter::Counter,
    )>,
    latency: Vec<(
        &'static str,
        prometheus_client::metrics::histogram::Histogram,
    )>,
}

impl MetricsCache {
    pub fn new(worker: u32) -> MetricsCache {
        MetricsCache {
            worker,
            requests: Vec::new(),
            latency: Vec::new(),
        }
    }

    pub fn observe(&mut self, state: &AppState, route: &'static str, status: u16, seconds: f64) {
        match self
            .requests
            .iter()
            .find(|(r, s, _)| *r == route && *s == status)
        {
            Some((_, _, counter)) => {
                counter.inc();
            }
            None => {
                let counter = state
                    .http
                    .requests
                    .get_or_create_owned(&RouteStatus { route, status });
                counter.inc();
                self.requests.push((route, status, counter));
            }
        }
        match self.latency.iter().find(|(r, _)| *r == route) {
            Some((_, histogram)) => histogram.observe(seconds),
            None => {
                let histogram = state.http.latency.get_or_create_owned(&RouteLabel {
                    route,
                    worker: self.worker,
                });
                histogram.observe(seconds);
                self.latency.push((route, histogram));
            }
        }
    }
}
