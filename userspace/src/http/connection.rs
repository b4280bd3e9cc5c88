//! One HTTP connection's state (buffers, deadline) and the answering of the requests it sent, with
//! no I/O: the event loop in server.rs reads and writes the socket and calls in here.

use std::fs::File;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use governor::DefaultKeyedRateLimiter;

use super::pending::PartialBuf;
use super::request::{self, Parse};
use super::routes::{self, Access, Request, Response, Routed};
use super::state::AppState;

pub(super) struct Conn {
    pub io: File,
    /// None for Unix-socket peers (exempt from the per-source limit: they are local).
    pub peer: Option<IpAddr>,
    pub local: bool,
    /// The bytes of a request not complete yet (and of any pipelined behind it).
    pub partial: PartialBuf,
    /// Replies not written yet.
    pub outbuf: Vec<u8>,
    pub clock: Clock,
    pub close_after_flush: bool,
    /// Registered for EPOLLOUT (replies waiting) rather than EPOLLIN.
    pub writing: bool,
}

impl Conn {
    pub fn new(io: File, peer: Option<IpAddr>, timeouts: &Timeouts, now: Instant) -> Conn {
        Conn {
            io,
            peer,
            local: peer.is_none_or(|ip| ip.is_loopback()),
            partial: PartialBuf::default(),
            outbuf: Vec::new(),
            clock: Clock {
                deadline: later(now, timeouts.idle),
                in_request: false,
            },
            close_after_flush: false,
            writing: false,
        }
    }
}

/// When a connection times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Clock {
    pub deadline: Instant,
    /// `deadline` is a partial request's (answered 408), not an idle connection's.
    pub in_request: bool,
}

/// A connection's two clocks. The request clock starts at a request's first byte and covers its
/// request line, headers and body: later reads never restart it, so a client trickling bytes gets
/// its 408 on time. The idle clock runs between requests of a kept-alive connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub request: Duration,
    pub idle: Duration,
}

impl Timeouts {
    /// Sets the clock after a read was answered. `partial`: bytes of an incomplete request are
    /// left; `new_request`: they began after the last answered request (or on an idle
    /// connection), so their clock starts now. A request already on the clock keeps its deadline.
    pub fn rearm(&self, clock: &mut Clock, partial: bool, new_request: bool, now: Instant) {
        if !partial {
            *clock = Clock {
                deadline: later(now, self.idle),
                in_request: false,
            };
        } else if new_request || !clock.in_request {
            *clock = Clock {
                deadline: later(now, self.request),
                in_request: true,
            };
        }
    }
}

/// `now + d`, saturating far in the future instead of overflowing on absurd durations.
fn later(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

/// Replies one connection may have waiting before it stops answering further pipelined requests
/// until they are written: a client that pipelines many requests and reads slowly costs at most this
/// plus one reply (a `/metrics` page, say), and the requests it has not had answered stay in its
/// partial buffer, which the pending budget bounds.
pub const MAX_WAITING_REPLIES: usize = 64 * 1024;

/// What the server must do once a connection's complete requests are answered.
pub(super) enum Outcome {
    Continue,
    /// Run a CPU profile and answer it on a thread of its own.
    Profile {
        seconds: u64,
        flamegraph: bool,
    },
}

/// Everything an HTTP worker needs to answer requests, apart from the connections themselves.
pub(super) struct Responder {
    pub state: Arc<AppState>,
    pub access: Access,
    pub limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    pub date: HttpDate,
    pub metrics: routes::MetricsCache,
}

impl Responder {
    /// Answers the complete requests at the front of `input`, in order, appending the replies to
    /// `conn.outbuf`, until [`MAX_WAITING_REPLIES`] bytes of replies wait. Returns the bytes those
    /// requests took and what to do next.
    pub fn answer(&mut self, conn: &mut Conn, input: &[u8]) -> (usize, Outcome) {
        let date = self.date.get();
        let mut consumed = 0;
        while consumed < input.len()
            && !conn.close_after_flush
            && conn.outbuf.len() < MAX_WAITING_REPLIES
        {
            let started = Instant::now();
            let (head, len) = match request::parse(&input[consumed..]) {
                Parse::Partial => break,
                Parse::Reject { status, message } => {
                    refuse(conn, &Response::error(status, message), date, &self.state);
                    break;
                }
                Parse::Complete { head, len } => (head, len),
            };
            consumed += len;
            let limited = match (&self.limiter, conn.peer) {
                (Some(limiter), Some(ip)) => limiter.check_key(&ip).is_err(),
                _ => false,
            };
            let response = if limited {
                Response::error(429, "rate limit exceeded for this source: slow down")
            } else {
                let request = Request {
                    head,
                    local_peer: conn.local,
                };
                match routes::route(&request, &self.state, &self.access) {
                    Routed::Respond(r) => r,
                    Routed::Profile {
                        seconds,
                        flamegraph,
                    } => {
                        let profile = Outcome::Profile {
                            seconds,
                            flamegraph,
                        };
                        return (consumed, profile);
                    }
                }
            };
            write_response(
                &mut conn.outbuf,
                &response,
                head.head_only,
                head.close,
                date,
            );
            let route = routes::route_label(head.path);
            let seconds = started.elapsed().as_secs_f64();
            self.metrics
                .observe(&self.state, route, response.status, seconds);
            conn.close_after_flush |= head.close;
        }
        (consumed, Outcome::Continue)
    }

    /// Keeps `bytes` (the start of a request) in the connection's partial buffer, within the
    /// process-wide budget. When the budget is spent the connection gets 503 and is closed.
    pub fn keep_partial(&mut self, conn: &mut Conn, bytes: &[u8]) {
        let http = &self.state.http_conns;
        if conn.partial.append(&http.pending, bytes) {
            return;
        }
        http.over_budget
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        conn.partial.release(&http.pending);
        let mut response = Response::error(
            503,
            "the server holds too many partial requests: retry in a moment",
        );
        response.extra_header = Some("Retry-After: 1");
        refuse(conn, &response, self.date.get(), &self.state);
    }

    /// Answers a connection whose request did not arrive in time with 408 and marks it closing.
    pub fn time_out(&mut self, conn: &mut Conn) {
        let response = Response::error(408, "the request was not received in time");
        refuse(conn, &response, self.date.get(), &self.state);
    }
}

/// Answers an unusable request with `response` and closes the connection after the reply.
fn refuse(conn: &mut Conn, response: &Response, date: &str, state: &AppState) {
    write_response(&mut conn.outbuf, response, false, true, date);
    routes::observe(state, "other", response.status, 0.0);
    conn.close_after_flush = true;
}

/// The Date header value, formatted once per second.
#[derive(Default)]
pub(super) struct HttpDate {
    second: u64,
    text: String,
}

impl HttpDate {
    pub fn get(&mut self) -> &str {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        &self.text
    }
}

/// Serializes a response (status line, headers, body) onto `out`, without `fmt` on the hot path.
pub fn write_response(out: &mut Vec<u8>, r: &Response, head_only: bool, close: bool, date: &str) {
    let body = r.body.bytes();
    let mut digits = [0u8; 20];
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(crate::wire::decimal(u64::from(r.status), &mut digits));
    out.push(b' ');
    out.extend_from_slice(routes::reason_phrase(r.status).as_bytes());
    out.extend_from_slice(b"\r\nServer: ricochet\r\nDate: ");
    out.extend_from_slice(date.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(r.content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    out.extend_from_slice(crate::wire::decimal(body.len() as u64, &mut digits));
    out.extend_from_slice(b"\r\n");
    if let Some(extra) = r.extra_header {
        out.extend_from_slice(extra.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::http::routes::Body;

    #[test]
    fn the_request_clock_starts_at_the_first_byte_and_never_restarts() {
        let timeouts = Timeouts {
            request: Duration::from_secs(2),
            idle: Duration::from_secs(60),
        };
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut clock = Clock {
            deadline: at(60.0),
            in_request: false,
        };
        // A first byte at 1 s; more bytes at 1.5, 2 and 2.5 s leave the deadline at 3 s.
        timeouts.rearm(&mut clock, true, false, at(1.0));
        assert_eq!(
            clock,
            Clock {
                deadline: at(3.0),
                in_request: true
            }
        );
        for s in [1.5, 2.0, 2.5] {
            timeouts.rearm(&mut clock, true, false, at(s));
            assert_eq!(clock.deadline, at(3.0));
        }
        // The request completes and the next one has begun in the same read: a new clock.
        timeouts.rearm(&mut clock, true, true, at(2.9));
        assert_eq!(
            clock,
            Clock {
                deadline: at(4.9),
                in_request: true
            }
        );
        // Nothing left: the idle clock.
        timeouts.rearm(&mut clock, false, true, at(3.0));
        assert_eq!(
            clock,
            Clock {
                deadline: at(63.0),
                in_request: false
            }
        );
    }

    #[test]
    fn absurd_timeouts_do_not_overflow() {
        let timeouts = Timeouts {
            request: Duration::MAX,
            idle: Duration::MAX,
        };
        let mut clock = Clock {
            deadline: Instant::now(),
            in_request: false,
        };
        timeouts.rearm(&mut clock, true, true, Instant::now());
        timeouts.rearm(&mut clock, false, true, Instant::now());
        assert!(clock.deadline > Instant::now() + Duration::from_secs(3600));
    }

    #[test]
    fn response_head_is_well_formed() {
        let mut out = Vec::new();
        let r = Response {
            status: 404,
            content_type: "application/json",
            body: Body::Static(b"{}"),
            extra_header: Some("Allow: GET"),
        };
        write_response(&mut out, &r, false, true, "Sun, 22 Nov 2026 15:00:00 GMT");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nServer: ricochet\r\nDate: Sun, 22 Nov 2026 15:00:00 GMT\r\nContent-Type: application/json\r\nContent-Length: 2\r\nAllow: GET\r\nConnection: close\r\n\r\n{}"
        );
    }
}
