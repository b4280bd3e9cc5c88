//! CPU profiles for `GET /debug/pprof/profile`: the pprof crate samples every thread of the process
//! with SIGPROF; the result is pprof protobuf (read by `go tool pprof` and `pprof`) or a flamegraph SVG.
//!
//! Memory: symbolizing the samples goes through the backtrace crate, which maps the executable and
//! keeps its parsed debug information in a process-wide cache (about 64 MB for a release build with
//! debug info); pprof replaces its sample table at the end of every profile, the old one freed below
//! the new. Both are released after every profile: the cache cleared, the freed heap given back to
//! the kernel. What stays is pprof's sample table (4,096 buckets of 4 stacks of up to 128 frames,
//! about 66 MB) from the first profile on, reused by every later one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pprof::protos::Message;

use super::routes::{Body, Response};

/// One profile at a time: the sampler is process-wide.
static PROFILING: AtomicBool = AtomicBool::new(false);

/// Profiles the process for `seconds` and returns the response to send.
pub fn run(seconds: u64, flamegraph: bool) -> Response {
    if PROFILING.swap(true, Ordering::AcqRel) {
        return Response::error(409, "a profile is already running: try again when it ends");
    }
    let _running = Running;
    profile(seconds, flamegraph)
}

/// Ends a profile, however `profile` returns: frees the symbol cache, allows the next profile.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        backtrace::clear_symbol_cache();
        crate::sys::release_free_heap();
        PROFILING.store(false, Ordering::Release);
    }
}

fn profile(seconds: u64, flamegraph: bool) -> Response {
    let guard = match pprof::ProfilerGuardBuilder::default()
        .frequency(99)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
    {
        Ok(g) => g,
        Err(e) => return Response::error(500, &format!("cannot start the profiler: {e}")),
    };
    std::thread::sleep(Duration::from_secs(seconds));
    let report = match guard.report().build() {
        Ok(r) => r,
        Err(e) => return Response::error(500, &format!("cannot build the profile: {e}")),
    };
    if flamegraph {
        let mut svg = Vec::new();
        return match report.flamegraph(&mut svg) {
            Ok(()) if svg.is_empty() => {
                // An idle process may give no samples at all; say so in a valid SVG.
                let text = format!(
                    "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\"><text x=\"10\" y=\"25\">no CPU samples in {seconds} s: the process was idle</text></svg>\n"
                );
                Response {
                    status: 200,
                    content_type: "image/svg+xml",
                    body: Body::Owned(text.into_bytes()),
                    extra_header: None,
                }
            }
            Ok(()) => Response {
                status: 200,
                content_type: "image/svg+xml",
                body: Body::Owned(svg),
                extra_header: None,
            },
            Err(e) => Response::error(500, &format!("cannot draw the flamegraph: {e}")),
        };
    }
    match report.pprof() {
        Ok(profile) => Response {
            status: 200,
            content_type: "application/octet-stream",
            body: Body::Owned(profile.encode_to_vec()),
            extra_header: Some("Content-Disposition: attachment; filename=\"profile.pb\""),
        },
        Err(e) => Response::error(500, &format!("cannot encode the profile: {e}")),
    }
}
