//! Configuration value types shared by every command and datapath: listen SPECs
//! (`[PROTO+]TRANSPORT://ADDR`), CPU lists (`0-3,6`), durations (`250ms`, `10s`, `7d`) and the
//! mode words (`--poll`, `--xdp-mode`, `--zero-copy`). Pure parsing, no I/O.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::core::Protocol;

/// Where a listener (or a bench target) lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Udp(SocketAddr),
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Transport {
    pub const fn scheme(&self) -> &'static str {
        match self {
            Transport::Udp(_) => "udp",
            Transport::Tcp(_) => "tcp",
            Transport::Unix(_) => "unix",
        }
    }

    /// Whether requests arrive on a byte stream (TCP, Unix) rather than as datagrams.
    pub const fn is_stream(&self) -> bool {
        !matches!(self, Transport::Udp(_))
    }
}

/// `[PROTO+]TRANSPORT://ADDR`, e.g. `udp://0.0.0.0:7777`, `sockperf+udp://127.0.0.1:11111`,
/// `echo+tcp://[::1]:7000`, `unix:///run/ricochet.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ListenSpec {
    pub protocol: Protocol,
    pub transport: Transport,
}

/// A SPEC that cannot be used, with what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad listen spec '{spec}': {reason}")]
pub struct SpecError {
    spec: String,
    reason: String,
}

impl FromStr for ListenSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<ListenSpec, SpecError> {
        let fail = |reason: String| SpecError {
            spec: spec.to_string(),
            reason,
        };
        let (scheme, addr) = spec.split_once("://").ok_or_else(|| {
            fail("expected [PROTO+]TRANSPORT://ADDR, e.g. udp://0.0.0.0:7777 or sockperf+udp://127.0.0.1:11111".into())
        })?;
        let (protocol, transport) = match scheme.split_once('+') {
            Some((proto, transport)) => (proto.parse::<Protocol>().map_err(fail)?, transport),
            None => (Protocol::Counter, scheme),
        };
        let socket_addr = |addr: &str| -> Result<SocketAddr, SpecError> {
            if let Ok(sa) = addr.parse::<SocketAddr>() {
                return Ok(sa);
            }
            if !addr.contains(':') {
                return Err(fail(format!(
                    "'{addr}' has no port: write HOST:PORT, e.g. 0.0.0.0:7777 or [::1]:7777"
                )));
            }
            addr.to_socket_addrs()
                .map_err(|e| fail(format!("cannot resolve '{addr}': {e}")))?
                .next()
                .ok_or_else(|| fail(format!("'{addr}' resolves to no address")))
        };
        let transport = match transport {
            "udp" => Transport::Udp(socket_addr(addr)?),
            "tcp" => Transport::Tcp(socket_addr(addr)?),
            "unix" => {
                if addr.is_empty() {
                    return Err(fail(
                        "unix needs a filesystem path, e.g. unix:///run/ricochet.sock".into(),
                    ));
                }
                Transport::Unix(PathBuf::from(addr))
            }
            other => {
                return Err(fail(format!(
                    "unknown transport '{other}': use udp, tcp or unix"
                )))
            }
        };
        Ok(ListenSpec {
            protocol,
            transport,
        })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Udp(a) | Transport::Tcp(a) => {
                write!(f, "{}+{}://{}", self.protocol, self.transport.scheme(), a)
            }
            Transport::Unix(p) => write!(f, "{}+unix://{}", self.protocol, p.display()),
        }
    }
}

/// A CPU number as the kernel numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct CpuId(pub usize);

impl fmt::Display for CpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A list of CPUs in the kernel's list format: `0-3,6,8-9`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CpuList(pub Vec<CpuId>);

/// The largest CPU number Linux can have (NR_CPUS is at most 8192); also bounds queue lists.
pub const MAX_CPU_ID: usize = 8191;

impl FromStr for CpuList {
    type Err = String;
    fn from_str(s: &str) -> Result<CpuList, String> {
        let mut cpus = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let parse = |n: &str| {
                let cpu = n.trim().parse::<usize>().map_err(|_| {
                    format!("bad CPU list '{s}': '{n}' is not a CPU number; write e.g. 0-3,6")
                })?;
                // Checked before a range is expanded, so no list can ask for an absurd allocation.
                if cpu > MAX_CPU_ID {
                    return Err(format!(
                        "bad CPU list '{s}': {cpu} is beyond {MAX_CPU_ID}, the largest CPU (or queue) number Linux supports"
                    ));
                }
                Ok(cpu)
            };
            match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (parse(lo)?, parse(hi)?);
                    if lo > hi {
                        return Err(format!(
                            "bad CPU list '{s}': range {lo}-{hi} runs backwards"
                        ));
                    }
                    cpus.extend((lo..=hi).map(CpuId));
                }
                None => cpus.push(CpuId(parse(part)?)),
            }
        }
        if cpus.is_empty() {
            return Err(format!(
                "bad CPU list '{s}': it names no CPU; write e.g. 0-3,6"
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = cpus.iter().find(|c| !seen.insert(**c)) {
            return Err(format!("bad CPU list '{s}': CPU {dup} appears twice"));
        }
        Ok(CpuList(cpus))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|c| c.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

/// Declares a configuration word: a clap value, serialised and deserialised in lowercase (profiles,
/// /stats), shown by `Display` the same way.
macro_rules! mode_word {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use mode_word;

mode_word! {
    /// How a worker waits for work.
    PollMode {
        /// Busy-loop on non-blocking sockets: lowest latency, one core at 100%.
        Spin => "spin",
        /// Sleep in epoll until a socket is ready: efficient.
        Block => "block",
    }
}

mode_word! {
    /// Where the XDP program runs.
    #[derive(Default)]
    XdpAttachMode {
        /// In the driver (fastest; the driver must support XDP).
        Native => "native",
        /// In the kernel's generic receive path (works everywhere, slower).
        Generic => "generic",
        /// Native, falling back to generic when the driver refuses.
        #[default]
        Auto => "auto",
    }
}

mode_word! {
    /// Whether to ask the driver for AF_XDP zero-copy.
    #[derive(Default)]
    ZeroCopy {
        /// Try zero-copy, fall back to copy mode.
        #[default]
        Auto => "auto",
        /// Zero-copy or fail.
        On => "on",
        /// Copy mode.
        Off => "off",
    }
}

impl CpuList {
    /// Checks this list against the CPUs the process may use; `None` (no `--cpus`) means all of
    /// them.
    pub fn resolve(requested: Option<&CpuList>, allowed: &[CpuId]) -> Result<Vec<CpuId>, String> {
        let Some(requested) = requested else {
            return Ok(allowed.to_vec());
        };
        match requested.0.iter().find(|cpu| !allowed.contains(cpu)) {
            Some(cpu) => Err(format!(
                "CPU {cpu} is not allowed for this process (allowed: {}): pick --cpus from those",
                CpuList(allowed.to_vec())
            )),
            None => Ok(requested.0.clone()),
        }
    }
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The units a duration may be written in, longest first, in nanoseconds.
const DURATION_UNITS: [(&str, u128); 7] = [
    ("d", 86_400 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses a duration: a decimal number and a unit, `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h` or `d`
/// (`150us`, `2.5s`, `10m`, `7d`); a bare number is seconds. Exact to the nanosecond (no floating
/// point), and never panics: a value too long for [`Duration`] is an error.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let nanos = duration_nanos(text)?;
    let seconds = u64::try_from(nanos / NANOS_PER_SEC)
        .map_err(|_| format!("duration '{}' is too long", text.trim()))?;
    // The remainder is below one second, so it fits in u32.
    Ok(Duration::new(seconds, (nanos % NANOS_PER_SEC) as u32))
}

/// A clap value parser for a duration flag that must lie within `min..=max`, e.g.
/// `value_parser = duration_in(Duration::from_millis(1), Duration::from_secs(7 * 86_400))`.
/// clap names the flag; the message gives the range: "must be between 1ms and 7d: got 1e9d".
pub fn duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |text: &str| {
        let nanos = duration_nanos(text)?;
        if nanos < min.as_nanos() || nanos > max.as_nanos() {
            return Err(format!(
                "must be between {} and {}: got {}",
                format_duration(min),
                format_duration(max),
                text.trim()
            ));
        }
        parse_duration(text)
    }
}

/// Writes a duration in the largest unit that states it exactly: `7d`, `100ms`, `1500us`, `0s`.
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    let (unit, size) = DURATION_UNITS
        .iter()
        .find(|(_, size)| nanos.is_multiple_of(*size))
        .copied()
        .unwrap_or(("ns", 1));
    format!("{}{unit}", nanos / size)
}

/// The nanoseconds a duration text stands for, saturating at `u128::MAX` for absurd values so that
/// range checks report them as out of range rather than as unreadable.
fn duration_nanos(text: &str) -> Result<u128, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit_nanos = match unit {
        "" => NANOS_PER_SEC,
        "µs" => 1_000,
        _ => match DURATION_UNITS.iter().find(|(name, _)| *name == unit) {
            Some(&(_, size)) => size,
            None => {
                return Err(format!(
                    "bad duration '{s}': unit '{unit}' is not one of ns, us, ms, s, m, h, d"
                ))
            }
        },
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let bad = || format!("bad duration '{s}': write e.g. 10s, 500ms or 2m");
    if (whole.is_empty() && fraction.is_empty()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // `whole` holds only digits, so a parse failure past the empty case means overflow.
    let whole_nanos = match whole {
        "" => 0,
        digits => digits
            .parse::<u128>()
            .ok()
            .and_then(|w| w.checked_mul(unit_nanos))
            .unwrap_or(u128::MAX),
    };
    // 18 fraction digits are more than a nanosecond of a day needs (14), and keep the product
    // below 10^18 * 8.64 * 10^13, far inside u128.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_nanos = match fraction {
        "" => 0,
        digits => {
            let value: u128 = digits.parse().map_err(|_| bad())?;
            value * unit_nanos / 10u128.pow(digits.len() as u32)
        }
    };
    Ok(whole_nanos.saturating_add(fraction_nanos))
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 250ms "), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0.001"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_duration(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("150us"), Ok(Duration::from_micros(150)));
        assert_eq!(parse_duration("150µs"), Ok(Duration::from_micros(150)));
        assert_eq!(parse_duration("0.3s"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("1.0000000009s"), Ok(Duration::new(1, 0)));
        for bad in [
            "ten",
            "5 parsecs",
            "",
            ".",
            "1.2.3s",
            "-1s",
            "1e30s",
            "infs",
            "NaN",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn absurd_durations_are_errors_not_panics() {
        // u64::MAX seconds is a Duration (ranges refuse it); one more second is not.
        assert!(parse_duration("18446744073709551615s").is_ok());
        for huge in [
            "18446744073709551616",
            "20000000000000000000s",
            "99999999999999999999999999999999999999999999999999d",
            "213503982334602d",
        ] {
            let err = parse_duration(huge).unwrap_err();
            assert!(err.contains("too long"), "{huge}: {err}");
        }
        // The longest duration there is still parses.
        assert_eq!(
            parse_duration("18446744073709551615.999999999s"),
            Ok(Duration::MAX)
        );
    }

    #[test]
    fn ranges_name_their_bounds() {
        let week = Duration::from_secs(7 * 86_400);
        let parse = duration_in(Duration::from_millis(1), week);
        assert_eq!(parse("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse("7d"), Ok(week));
        for (text, shown) in [
            ("18446744073709551615s", "18446744073709551615s"),
            ("999999999999999999999999999999999999999999d", "9999"),
            ("7.000001d", "7.000001d"),
            ("999us", "999us"),
            ("0", "got 0"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                err.starts_with("must be between 1ms and 7d: got ") && err.contains(shown),
                "{text}: {err}"
            );
        }
        assert!(parse("soon").unwrap_err().contains("bad duration"));
    }

    #[test]
    fn formats_in_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
        assert_eq!(format_duration(Duration::from_secs(3_600)), "1h");
        assert_eq!(format_duration(Duration::from_millis(100)), "100ms");
        assert_eq!(format_duration(Duration::from_micros(1_500)), "1500us");
        assert_eq!(format_duration(Duration::from_nanos(7)), "7ns");
    }

    #[test]
    fn parses_the_readme_examples() {
        let s: ListenSpec = "udp://0.0.0.0:7777".parse().unwrap();
        assert_eq!(s.protocol, Protocol::Counter);
        assert_eq!(s.transport, Transport::Udp("0.0.0.0:7777".parse().unwrap()));
        let s: ListenSpec = "sockperf+udp://0.0.0.0:11111".parse().unwrap();
        assert_eq!(s.protocol, Protocol::Sockperf);
        let s: ListenSpec = "unix:///run/ricochet.sock".parse().unwrap();
        assert_eq!(s.transport, Transport::Unix("/run/ricochet.sock".into()));
        let s: ListenSpec = "echo+tcp://[::1]:7000".parse().unwrap();
        assert_eq!(s.to_string(), "echo+tcp://[::1]:7000");
    }

    #[test]
    fn rejects_with_a_reason() {
        for (spec, needle) in [
            ("0.0.0.0:7777", "expected [PROTO+]TRANSPORT://ADDR"),
            ("quic://0.0.0.0:1", "unknown transport 'quic'"),
            ("ping+udp://0.0.0.0:1", "unknown protocol 'ping'"),
            ("udp://0.0.0.0", "has no port"),
            ("unix://", "needs a filesystem path"),
        ] {
            let err = spec.parse::<ListenSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn cpu_lists() {
        let l: CpuList = "0-2,5".parse().unwrap();
        assert_eq!(l.0, vec![CpuId(0), CpuId(1), CpuId(2), CpuId(5)]);
        assert!("3-1".parse::<CpuList>().is_err());
        assert!("1,1".parse::<CpuList>().is_err());
        assert!("x".parse::<CpuList>().is_err());
        assert!("".parse::<CpuList>().is_err());
        // Found by fuzzing: huge ranges were expanded before any check (capacity overflow, a 333 TB
        // allocation, or minutes of work).
        for huge in [
            "0-18446744073709551615",
            "1840-41674407377955",
            "86-898999",
            "8192",
        ] {
            let err = huge.parse::<CpuList>().unwrap_err();
            assert!(err.contains("beyond 8191"), "{huge}: {err}");
        }
        assert_eq!("8191".parse::<CpuList>().unwrap().0, vec![CpuId(8191)]);
    }
}
