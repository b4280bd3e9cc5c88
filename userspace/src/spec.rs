//! Command-line value types: listen SPECs (`[PROTO+]TRANSPORT://ADDR`) and CPU lists (`0-3,6`).

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

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

impl FromStr for CpuList {
    type Err = String;
    fn from_str(s: &str) -> Result<CpuList, String> {
        let mut cpus = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let parse = |n: &str| {
                n.trim().parse::<usize>().map_err(|_| {
                    format!("bad CPU list '{s}': '{n}' is not a CPU number; write e.g. 0-3,6")
                })
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

#[cfg(test)]
mod test {
    use super::*;

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
    }
}
