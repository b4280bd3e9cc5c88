//! Facts about a network interface that the bypass datapaths and the hardware profiles read: how
//! many RX queues it has (sysfs) and which addresses it holds (getifaddrs).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The RX queues of an interface: the `rx-*` entries of its sysfs `queues` directory, read under
/// `root` (`/` on a real machine, a fake tree in tests).
pub fn rx_queue_count_under(root: &Path, iface: &str) -> std::io::Result<u32> {
    let dir = root.join("sys/class/net").join(iface).join("queues");
    let n = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok(n as u32)
}

/// The RX queues this machine's interface `iface` has.
pub fn rx_queue_count(iface: &str) -> Result<u32> {
    rx_queue_count_under(Path::new("/"), iface)
        .with_context(|| format!("no interface named '{iface}': list them with 'ip link'"))
}

/// The MTU of `iface` (sysfs).
pub fn mtu(iface: &str) -> Result<u32> {
    let path = format!("/sys/class/net/{iface}/mtu");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no interface named '{iface}': list them with 'ip link'"))?;
    text.trim()
        .parse()
        .with_context(|| format!("{path} holds {text:?}, not an MTU"))
}

/// The IPv4 and IPv6 addresses `iface` holds.
pub fn addresses(iface: &str) -> Result<Vec<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()
        .context("cannot list interface addresses")?
        .filter(|a| a.interface_name == iface)
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// Checks that every UDP listener address is the unspecified address or one of the interface's
/// own: an XDP program on `iface` only ever sees frames for those.
pub fn check_listener_addresses(
    iface: &str,
    listeners: impl IntoIterator<Item = SocketAddr>,
) -> Result<()> {
    let own = addresses(iface)?;
    for addr in listeners {
        if !addr.ip().is_unspecified() && !own.contains(&addr.ip()) {
            let list: Vec<String> = own.iter().map(|a| a.to_string()).collect();
            bail!(
                "listener udp://{addr}: {} is not an address of {iface} (it has: {}); listen on one of those or on 0.0.0.0",
                addr.ip(),
                if list.is_empty() { "none".to_string() } else { list.join(", ") }
            );
        }
    }
    Ok(())
}
