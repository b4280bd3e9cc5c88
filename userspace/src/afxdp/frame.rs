//! The checked view of a received Ethernet frame that the XDP programs, the AF_XDP worker and the
//! tests agree on, and the in-place rewrite of a request into its reply.
//!
//! [`classify`] applies the parse rules of `ebpf/ricochet.bpf.c` (`parse_request`), in the same order:
//! Ethernet with up to two 802.1Q or 802.1ad tags; IPv4 of version 4 with a 20-byte header (no
//! options) that is not a later fragment, or IPv6 of version 6 whose next header is UDP (no extension
//! headers); a UDP header within the frame; a listener for its destination (the exact address first,
//! then the wildcard of that family). Anything else is the kernel's ([`Verdict::Pass`]). A datagram
//! for a listener is then dropped for the first of: first fragment, truncated (the IP or UDP length
//! runs past the frame, or the UDP length is below 8), source port 0, a payload length the protocol
//! never accepts. What is left may be a valid request. The differential test
//! (`tests/xdp_differential.rs`) runs the programs and this view over generated frames and requires
//! the same verdicts, statistics and reply bytes.
//!
//! Sans-IO: bytes in, bytes out; nothing allocates after [`Listeners::new`].

use std::net::{IpAddr, SocketAddr};

use crate::core::Protocol;
use crate::stats::DropReason;
use crate::wire::{FRAME_LEN, SOCKPERF_HEADER_LEN};
use crate::xdp::maps::{ListenerKey, TRANSPORT_UDP};

const ETHERNET_HEADER_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;
pub(super) const ETHERTYPE_IPV4: u16 = 0x0800;
pub(super) const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_8021Q: u16 = 0x8100;
const ETHERTYPE_8021AD: u16 = 0x88a8;
pub(super) const IPV4_HEADER_LEN: usize = 20;
pub(super) const IPV6_HEADER_LEN: usize = 40;
const UDP_HEADER_LEN: usize = 8;
const IPPROTO_UDP: u8 = 17;
/// IPv4 flags and fragment offset: more fragments, and the offset in 8-byte units.
pub(super) const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
pub(super) const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;

/// A destination as the programs' `listeners` map keys it: port, family (4 or 6) and address, an
/// IPv4 address in the first four bytes. Ordered by port first, so a lookup is a binary search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Destination {
    port: u16,
    family: u8,
    /// The IP protocol number of the transport (`listener_key.transport`).
    transport: u8,
    addr: [u8; 16],
}

impl Destination {
    fn of(key: ListenerKey) -> Destination {
        Destination {
            port: u16::from_be(key.port_be),
            family: key.family,
            transport: key.transport,
            addr: key.addr,
        }
    }

    /// The destination of a frame: `ipv6` selects the family, `addr` holds 4 or 16 bytes.
    pub(super) fn from_frame(transport: u8, ipv6: bool, addr: &[u8], port: u16) -> Destination {
        let mut bytes = [0u8; 16];
        bytes[..addr.len()].copy_from_slice(addr);
        Destination {
            port,
            family: if ipv6 { 6 } else { 4 },
            transport,
            addr: bytes,
        }
    }

    /// The wildcard (0.0.0.0 or ::) of the same family and port.
    fn wildcard(self) -> Destination {
        Destination {
            addr: [0; 16],
            ..self
        }
    }
}

/// The listeners, keyed as the programs' `listeners` map is: built once, sorted, looked up by binary
/// search without allocating (a handful of listeners fit in a cache line or two).
#[derive(Debug, Clone, Default)]
pub struct Listeners {
    sorted: Vec<(Destination, Protocol)>,
}

impl Listeners {
    /// A later listener with the same address and port replaces an earlier one, as an update of the
    /// programs' hash map does.
    pub fn new(listeners: &[(SocketAddr, Protocol)]) -> Listeners {
        Listeners::with_tcp(listeners, &[])
    }

    /// UDP listeners and TCP listeners (whose segments TCP-lite answers).
    pub fn with_tcp(udp: &[(SocketAddr, Protocol)], tcp: &[(SocketAddr, Protocol)]) -> Listeners {
        let keys = udp
            .iter()
            .map(|(addr, p)| (ListenerKey::new(*addr), *p))
            .chain(tcp.iter().map(|(addr, p)| (ListenerKey::tcp(*addr), *p)));
        let mut sorted: Vec<(Destination, Protocol)> = Vec::with_capacity(udp.len() + tcp.len());
        for (key, protocol) in keys {
            let key = Destination::of(key);
            match sorted.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = protocol,
                None => sorted.push((key, protocol)),
            }
        }
        sorted.sort_unstable_by_key(|(key, _)| *key);
        Listeners { sorted }
    }

    /// The protocol of the listener for `destination`: its exact address first, then the unspecified
    /// address (0.0.0.0 or ::) of the same family.
    pub fn lookup(&self, destination: SocketAddr) -> Option<Protocol> {
        self.find(Destination::of(ListenerKey::new(destination)))
    }

    pub(super) fn find(&self, key: Destination) -> Option<Protocol> {
        let get = |key: &Destination| {
            let i = self.sorted.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
            Some(self.sorted[i].1)
        };
        get(&key).or_else(|| get(&key.wildcard()))
    }
}

/// What the XDP programs do with a frame before looking at the payload's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not a datagram for a listener: the kernel's (XDP_PASS, `passed`).
    Pass,
    /// A datagram for a listener that can never be a valid request (XDP_DROP, counted by reason).
    Drop(DropReason),
    /// A datagram for a listener that may be a valid request: the whole datagram lies in the frame.
    Request { frame: UdpFrame, protocol: Protocol },
}

/// Classifies a frame by the programs' rules (see the module documentation).
pub fn classify(frame: &[u8], listeners: &Listeners) -> Verdict {
    classify_located(frame, listeners).1
}

/// Classifies a frame, parsing it once; also returns where its UDP datagram is, when it has one (a
/// dropped datagram's payload is still counted in `rx_bytes`).
pub fn classify_located(frame: &[u8], listeners: &Listeners) -> (Option<UdpFrame>, Verdict) {
    let Some(udp) = UdpFrame::locate(frame) else {
        return (None, Verdict::Pass);
    };
    let Some(protocol) = udp
        .destination_key(frame)
        .and_then(|key| listeners.find(key))
    else {
        return (Some(udp), Verdict::Pass);
    };
    let verdict = match udp.check(frame, protocol) {
        Ok(()) => Verdict::Request {
            frame: udp,
            protocol,
        },
        Err(reason) => Verdict::Drop(reason),
    };
    (Some(udp), verdict)
}

/// Where the parts of a UDP datagram are in a frame, found by the programs' parse rules.
///
/// `payload_offset..payload_offset + payload_len` always lies within the frame it was located in: it
/// is the part of the payload the frame holds. [`UdpFrame::check`] says whether that is the whole
/// datagram and may be a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFrame {
    ip_offset: usize,
    udp_offset: usize,
    ipv6: bool,
    /// IPv4 with more fragments to come and offset 0.
    first_fragment: bool,
    /// Where the IP header says the packet ends; it may lie beyond the frame.
    ip_end: usize,
    /// The UDP header's length field.
    udp_len: u16,
    pub payload_offset: usize,
    pub payload_len: usize,
}

pub(super) fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

/// The EtherType after up to two VLAN tags and where the network header starts.
pub(super) fn parse_ethernet(frame: &[u8]) -> Option<(u16, usize)> {
    let mut ethertype = be16(frame, 12)?;
    let mut offset = ETHERNET_HEADER_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETHERTYPE_8021Q && ethertype != ETHERTYPE_8021AD {
            break;
        }
        // The tag control information, then the next EtherType.
        ethertype = be16(frame, offset + 2)?;
        offset += VLAN_TAG_LEN;
    }
    Some((ethertype, offset))
}

impl UdpFrame {
    /// Locates the UDP header of an Ethernet frame. None for anything the programs pass to the
    /// kernel before looking for a listener (see the module documentation).
    pub fn locate(frame: &[u8]) -> Option<UdpFrame> {
        let (ethertype, ip_offset) = parse_ethernet(frame)?;
        let ip = frame.get(ip_offset..)?;
        let (ipv6, first_fragment, udp_offset, ip_end) = match ethertype {
            ETHERTYPE_IPV4 => {
                let header = ip.get(..IPV4_HEADER_LEN)?;
                if header[0] != 0x45 || header[9] != IPPROTO_UDP {
                    return None;
                }
                let fragment = u16::from_be_bytes([header[6], header[7]]);
                if fragment & IPV4_FRAGMENT_OFFSET != 0 {
                    // A later fragment has no UDP header: the kernel reassembles.
                    return None;
                }
                let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
                let first_fragment = fragment & IPV4_MORE_FRAGMENTS != 0;
                (
                    false,
                    first_fragment,
                    ip_offset + IPV4_HEADER_LEN,
                    ip_offset + total_len,
                )
            }
            ETHERTYPE_IPV6 => {
                let header = ip.get(..IPV6_HEADER_LEN)?;
                if header[0] >> 4 != 6 || header[6] != IPPROTO_UDP {
                    return None;
                }
                let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
                let udp_offset = ip_offset + IPV6_HEADER_LEN;
                (true, false, udp_offset, udp_offset + payload_len)
            }
            _ => return None,
        };
        let udp = frame.get(udp_offset..udp_offset + UDP_HEADER_LEN)?;
        let udp_len = u16::from_be_bytes([udp[4], udp[5]]);
        let payload_offset = udp_offset + UDP_HEADER_LEN;
        let payload_len = usize::from(udp_len)
            .saturating_sub(UDP_HEADER_LEN)
            .min(frame.len() - payload_offset);
        Some(UdpFrame {
            ip_offset,
            udp_offset,
            ipv6,
            first_fragment,
            ip_end,
            udp_len,
            payload_offset,
            payload_len,
        })
    }

    /// The drop rules for a datagram for a listener of `protocol`, in the programs' order: Ok when it
    /// may be a valid request, and then the payload is the whole datagram's.
    pub fn check(&self, frame: &[u8], protocol: Protocol) -> Result<(), DropReason> {
        if self.first_fragment {
            return Err(DropReason::Fragment);
        }
        let udp_len = usize::from(self.udp_len);
        if self.ip_end > frame.len()
            || udp_len < UDP_HEADER_LEN
            || self.udp_offset + udp_len > self.ip_end
        {
            return Err(DropReason::Truncated);
        }
        if self.source_port(frame) == Some(0) {
            return Err(DropReason::ZeroSourcePort);
        }
        let payload_len = udp_len - UDP_HEADER_LEN;
        match protocol {
            Protocol::Counter if payload_len != FRAME_LEN => Err(DropReason::WrongLength),
            Protocol::Sockperf if payload_len < SOCKPERF_HEADER_LEN => Err(DropReason::TooShort),
            _ => Ok(()),
        }
    }

    /// The UDP datagram's length field (header included).
    pub fn udp_len(&self) -> usize {
        usize::from(self.udp_len)
    }

    /// The source port of the located datagram.
    pub fn source_port(&self, frame: &[u8]) -> Option<u16> {
        be16(frame, self.udp_offset)
    }

    /// The destination address and port of the located datagram.
    pub fn destination(&self, frame: &[u8]) -> Option<(IpAddr, u16)> {
        let ip = self.ip_offset;
        let port = be16(frame, self.udp_offset + 2)?;
        let addr = if self.ipv6 {
            let b: [u8; 16] = frame.get(ip + 24..ip + 40)?.try_into().ok()?;
            IpAddr::from(b)
        } else {
            let b: [u8; 4] = frame.get(ip + 16..ip + 20)?.try_into().ok()?;
            IpAddr::from(b)
        };
        Some((addr, port))
    }

    /// The destination as the listener table keys it, read straight from the frame.
    fn destination_key(&self, frame: &[u8]) -> Option<Destination> {
        let port = be16(frame, self.udp_offset + 2)?;
        let addr = if self.ipv6 {
            frame.get(self.ip_offset + 24..self.ip_offset + 40)?
        } else {
            frame.get(self.ip_offset + 16..self.ip_offset + 20)?
        };
        Some(Destination::from_frame(
            TRANSPORT_UDP,
            self.ipv6,
            addr,
            port,
        ))
    }

    /// The source and destination address fields, in the frame's IP header.
    fn address_range(&self) -> (std::ops::Range<usize>, usize) {
        if self.ipv6 {
            (self.ip_offset + 8..self.ip_offset + 40, 16)
        } else {
            (self.ip_offset + 12..self.ip_offset + 20, 4)
        }
    }

    /// Turns the request into its reply in place, as the responder program does: MAC addresses, IP
    /// addresses and ports swapped, the UDP checksum recomputed in full (veth leaves request
    /// checksums partial). The payload must already hold the reply, which is as long as the request
    /// for every protocol (`reply_len == payload_len`), so the lengths and the IPv4 header checksum
    /// (a ones' complement sum does not depend on word order) stay as they are. Returns the reply
    /// frame's length: the request frame's, trailing bytes included; 0 if `frame` is not the frame
    /// this was located in.
    pub fn into_reply(self, frame: &mut [u8], reply_len: usize) -> usize {
        debug_assert_eq!(
            reply_len, self.payload_len,
            "replies are as long as requests"
        );
        let payload_end = self.payload_offset + self.payload_len;
        if frame.len() < payload_end {
            return 0;
        }
        let (macs, _) = frame.split_at_mut(12);
        let (dst, src) = macs.split_at_mut(6);
        dst.swap_with_slice(src);
        let (addresses, half) = self.address_range();
        let (src, dst) = frame[addresses.clone()].split_at_mut(half);
        src.swap_with_slice(dst);
        let u = self.udp_offset;
        let (sport, dport) = frame[u..u + 4].split_at_mut(2);
        sport.swap_with_slice(dport);
        frame[u + 6..u + 8].fill(0);
        let pseudo = ones_complement_sum(&frame[addresses], 0)
            + u64::from(IPPROTO_UDP)
            + u64::from(self.udp_len);
        let checksum = !fold(ones_complement_sum(&frame[u..payload_end], pseudo));
        // 0 means "no checksum" over IPv4 and is invalid over IPv6: its equal 0xffff is sent instead.
        let checksum = if checksum == 0 { 0xffff } else { checksum };
        frame[u + 6..u + 8].copy_from_slice(&checksum.to_be_bytes());
        frame.len()
    }
}

/// Adds `bytes` as big-endian 16-bit words to `sum` (RFC 1071), an odd last byte padded with zero.
pub(super) fn ones_complement_sum(bytes: &[u8], mut sum: u64) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a ones' complement sum to 16 bits.
pub(super) fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod test {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn v4(source_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .udp(source_port, 7777)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    fn v4_reply(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(SERVER_MAC, CLIENT_MAC)
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .udp(7777, 40000)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    fn listeners(protocol: Protocol) -> Listeners {
        Listeners::new(&[("198.18.0.1:7777".parse().unwrap(), protocol)])
    }

    fn request(frame: &[u8], listeners: &Listeners) -> UdpFrame {
        match classify(frame, listeners) {
            Verdict::Request { frame, .. } => frame,
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn listener_lookup_prefers_the_exact_address_then_the_wildcard_of_its_family() {
        let at = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let mut entries = vec![
            (at("0.0.0.0:7777"), Protocol::Echo),
            (at("198.18.0.1:7777"), Protocol::Counter),
            (at("[::]:11111"), Protocol::Sockperf),
        ];
        // Many more listeners on other ports: the lookup is a binary search, not a scan.
        entries.extend(
            (20000..20200).map(|p| (SocketAddr::new(at("198.18.0.9:1").ip(), p), Protocol::Echo)),
        );
        // A later entry for the same address and port replaces the earlier one.
        entries.push((at("198.18.0.9:20100"), Protocol::Counter));
        let listeners = Listeners::new(&entries);
        assert_eq!(
            listeners.lookup(at("198.18.0.1:7777")),
            Some(Protocol::Counter)
        );
        assert_eq!(
            listeners.lookup(at("198.18.0.2:7777")),
            Some(Protocol::Echo)
        );
        assert_eq!(
            listeners.lookup(at("[2001:db8::1]:7777")),
            None,
            "no IPv6 wildcard on 7777"
        );
        assert_eq!(
            listeners.lookup(at("[2001:db8::1]:11111")),
            Some(Protocol::Sockperf)
        );
        assert_eq!(
            listeners.lookup(at("198.18.0.1:11111")),
            None,
            "no IPv4 listener on 11111"
        );
        assert_eq!(
            listeners.lookup(at("198.18.0.9:20199")),
            Some(Protocol::Echo)
        );
        assert_eq!(
            listeners.lookup(at("198.18.0.9:20100")),
            Some(Protocol::Counter)
        );
        assert_eq!(listeners.lookup(at("198.18.0.9:20200")), None);
        assert_eq!(listeners.lookup(at("198.18.0.8:20150")), None);
    }

    #[test]
    fn ipv4_reply_matches_etherparse_byte_for_byte() {
        // Odd and even lengths, across the responder's old 1,500-byte limit.
        for len in [0usize, 1, 16, 17, 1472, 1473, 3001] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let mut frame = v4(40000, &payload);
            let udp = request(&frame, &listeners(Protocol::Echo));
            assert_eq!(udp.payload_len, len);
            let n = udp.into_reply(&mut frame, len);
            assert_eq!(&frame[..n], &v4_reply(&payload)[..], "{len} bytes");
        }
    }

    #[test]
    fn ipv6_and_vlan_frames_are_answered() {
        let builder = |reply: bool| {
            let (a, b) = if reply {
                ([2; 16], [1; 16])
            } else {
                ([1; 16], [2; 16])
            };
            let (ma, mb) = if reply {
                (SERVER_MAC, CLIENT_MAC)
            } else {
                (CLIENT_MAC, SERVER_MAC)
            };
            let (pa, pb) = if reply { (7777, 40000) } else { (40000, 7777) };
            let mut out = Vec::new();
            PacketBuilder::ethernet2(ma, mb)
                .double_vlan(
                    etherparse::VlanId::try_new(42).unwrap(),
                    etherparse::VlanId::try_new(7).unwrap(),
                )
                .ipv6(a, b, 64)
                .udp(pa, pb)
                .write(&mut out, &[9u8; 21])
                .unwrap();
            out
        };
        let listeners = Listeners::new(&[("[::]:7777".parse().unwrap(), Protocol::Echo)]);
        let mut frame = builder(false);
        let udp = request(&frame, &listeners);
        let n = udp.into_reply(&mut frame, 21);
        assert_eq!(&frame[..n], &builder(true)[..]);
    }

    #[test]
    fn drops_follow_the_programs_order() {
        let counter = listeners(Protocol::Counter);
        let valid = crate::wire::CounterRepr { value: 1 }.to_bytes();
        assert_eq!(
            classify(&v4(0, &valid), &counter),
            Verdict::Drop(DropReason::ZeroSourcePort)
        );
        // Truncated before source port 0, source port 0 before the length.
        let frame = v4(0, &valid);
        assert_eq!(
            classify(&frame[..frame.len() - 1], &counter),
            Verdict::Drop(DropReason::Truncated)
        );
        assert_eq!(
            classify(&v4(0, &valid[..15]), &counter),
            Verdict::Drop(DropReason::ZeroSourcePort)
        );
        assert_eq!(
            classify(&v4(1, &valid[..15]), &counter),
            Verdict::Drop(DropReason::WrongLength)
        );
        let sockperf = listeners(Protocol::Sockperf);
        assert_eq!(
            classify(&v4(1, &[0; 13]), &sockperf),
            Verdict::Drop(DropReason::TooShort)
        );
        // A first fragment before anything else.
        let mut first = v4(0, &valid);
        first[20] = 0x20;
        assert_eq!(
            classify(&first[..42], &counter),
            Verdict::Drop(DropReason::Fragment)
        );
        // A later fragment, options, another port: the kernel's.
        let mut later = v4(1, &valid);
        later[21] = 1;
        assert_eq!(classify(&later, &counter), Verdict::Pass);
        let mut options = v4(1, &valid);
        options[14] = 0x46;
        assert_eq!(classify(&options, &counter), Verdict::Pass);
        assert_eq!(
            classify(&v4(1, &valid), &Listeners::new(&[])),
            Verdict::Pass
        );
    }

    #[test]
    fn exact_listeners_win_over_wildcards_and_later_ones_replace_earlier() {
        let listeners = Listeners::new(&[
            ("0.0.0.0:7777".parse().unwrap(), Protocol::Echo),
            ("198.18.0.1:7777".parse().unwrap(), Protocol::Counter),
            ("198.18.0.1:7777".parse().unwrap(), Protocol::Sockperf),
        ]);
        let at = |addr: &str| listeners.lookup(addr.parse().unwrap());
        assert_eq!(at("198.18.0.1:7777"), Some(Protocol::Sockperf));
        assert_eq!(at("198.18.0.9:7777"), Some(Protocol::Echo));
        assert_eq!(at("198.18.0.1:7778"), None);
        // The IPv4 wildcard does not cover IPv6.
        assert_eq!(at("[::1]:7777"), None);
    }

    #[test]
    fn any_truncation_is_located_within_the_frame_and_never_panics() {
        let frame = v4(40000, b"abcdefghijklmnopq");
        let listeners = listeners(Protocol::Echo);
        for cut in 0..=frame.len() {
            let part = &frame[..cut];
            if let Some(udp) = UdpFrame::locate(part) {
                assert!(udp.payload_offset + udp.payload_len <= cut);
            }
            let whole = cut == frame.len();
            match classify(part, &listeners) {
                Verdict::Request { .. } => assert!(whole, "cut at {cut}"),
                Verdict::Drop(reason) => assert_eq!(reason, DropReason::Truncated),
                Verdict::Pass => assert!(cut < 42, "cut at {cut}"),
            }
        }
    }

    #[test]
    fn replies_parse_with_a_valid_checksum() {
        let mut frame = v4(40000, b"0123456789abcdef");
        let udp = request(&frame, &listeners(Protocol::Echo));
        let n = udp.into_reply(&mut frame, 16);
        let reply = SlicedPacket::from_ethernet(&frame[..n]).unwrap();
        let Some(TransportSlice::Udp(slice)) = reply.transport else {
            panic!("not UDP")
        };
        let expected = slice
            .to_header()
            .calc_checksum_ipv4_raw([198, 18, 0, 1], [198, 18, 0, 2], slice.payload())
            .unwrap();
        assert_eq!(slice.checksum(), expected);
    }
}
