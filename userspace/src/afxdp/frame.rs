//! Turning a received Ethernet frame into its reply in place: find the UDP payload, and once the core
//! has written the reply payload, swap MAC addresses, IP addresses and ports, fix lengths and
//! recompute the IPv4 header checksum and the UDP checksum (veth leaves request checksums partial).
//!
//! Sans-IO: bytes in, bytes out. Parsing and checksums use etherparse.

use etherparse::{Ipv4HeaderSlice, NetSlice, SlicedPacket, TransportSlice, UdpHeader};

/// Where the parts of a UDP frame are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFrame {
    ip_offset: usize,
    udp_offset: usize,
    pub payload_offset: usize,
    pub payload_len: usize,
    ipv6: bool,
}

impl UdpFrame {
    /// Locates the UDP payload of an Ethernet frame (VLAN tags allowed). None for anything that is not
    /// one whole, unfragmented UDP datagram in IPv4 or IPv6.
    pub fn locate(frame: &[u8]) -> Option<UdpFrame> {
        let packet = SlicedPacket::from_ethernet(frame).ok()?;
        let base = frame.as_ptr() as usize;
        let (ip_offset, ipv6) = match packet.net.as_ref()? {
            NetSlice::Ipv4(ip) => {
                if ip.is_payload_fragmented() {
                    return None;
                }
                (ip.header().slice().as_ptr() as usize - base, false)
            }
            NetSlice::Ipv6(ip) => {
                if ip.is_payload_fragmented() {
                    return None;
                }
                (ip.header().slice().as_ptr() as usize - base, true)
            }
            _ => return None,
        };
        let TransportSlice::Udp(udp) = packet.transport.as_ref()? else {
            return None;
        };
        let udp_offset = udp.slice().as_ptr() as usize - base;
        let payload = udp.payload();
        Some(UdpFrame {
            ip_offset,
            udp_offset,
            payload_offset: payload.as_ptr() as usize - base,
            payload_len: payload.len(),
            ipv6,
        })
    }

    /// The source port of the located datagram.
    pub fn source_port(&self, frame: &[u8]) -> Option<u16> {
        let u = self.udp_offset;
        Some(u16::from_be_bytes([*frame.get(u)?, *frame.get(u + 1)?]))
    }

    /// The destination address and port of the located datagram.
    pub fn destination(&self, frame: &[u8]) -> Option<(std::net::IpAddr, u16)> {
        let ip = self.ip_offset;
        let u = self.udp_offset;
        let port = u16::from_be_bytes([*frame.get(u + 2)?, *frame.get(u + 3)?]);
        let addr = if self.ipv6 {
            let b: [u8; 16] = frame.get(ip + 24..ip + 40)?.try_into().ok()?;
            std::net::IpAddr::from(b)
        } else {
            let b: [u8; 4] = frame.get(ip + 16..ip + 20)?.try_into().ok()?;
            std::net::IpAddr::from(b)
        };
        Some((addr, port))
    }

    /// Rewrites the frame, whose payload already holds the reply's first `reply_len` bytes, into the
    /// reply: addresses and ports swapped, lengths and checksums fixed. Returns the reply frame's
    /// length (never more than the request's).
    pub fn into_reply(self, frame: &mut [u8], reply_len: usize) -> usize {
        debug_assert!(reply_len <= self.payload_len);
        // Ethernet: swap destination and source.
        let (dst, src) = frame[..12].split_at_mut(6);
        dst.swap_with_slice(src);
        let udp_len = (8 + reply_len) as u16;
        let ip = self.ip_offset;
        if self.ipv6 {
            let (src, dst) = frame[ip + 8..ip + 40].split_at_mut(16);
            src.swap_with_slice(dst);
            frame[ip + 4..ip + 6].copy_from_slice(&udp_len.to_be_bytes());
        } else {
            let (src, dst) = frame[ip + 12..ip + 20].split_at_mut(4);
            src.swap_with_slice(dst);
            let ihl = (frame[ip] & 0x0f) as usize * 4;
            let total = (ihl as u16) + udp_len;
            frame[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
            frame[ip + 10..ip + 12].fill(0);
            let checksum = Ipv4HeaderSlice::from_slice(&frame[ip..ip + ihl])
                .map(|h| h.to_header().calc_header_checksum())
                .unwrap_or(0);
            frame[ip + 10..ip + 12].copy_from_slice(&checksum.to_be_bytes());
        }
        let u = self.udp_offset;
        let (sport, dport) = frame[u..u + 4].split_at_mut(2);
        sport.swap_with_slice(dport);
        frame[u + 4..u + 6].copy_from_slice(&udp_len.to_be_bytes());
        let header = UdpHeader {
            source_port: u16::from_be_bytes([frame[u], frame[u + 1]]),
            destination_port: u16::from_be_bytes([frame[u + 2], frame[u + 3]]),
            length: udp_len,
            checksum: 0,
        };
        let payload = &frame[self.payload_offset..self.payload_offset + reply_len];
        let checksum = if self.ipv6 {
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&frame[ip + 8..ip + 24]);
            dst.copy_from_slice(&frame[ip + 24..ip + 40]);
            header.calc_checksum_ipv6_raw(src, dst, payload)
        } else {
            let mut src = [0u8; 4];
            let mut dst = [0u8; 4];
            src.copy_from_slice(&frame[ip + 12..ip + 16]);
            dst.copy_from_slice(&frame[ip + 16..ip + 20]);
            header.calc_checksum_ipv4_raw(src, dst, payload)
        }
        .unwrap_or(0);
        frame[u + 6..u + 8].copy_from_slice(&checksum.to_be_bytes());
        self.payload_offset + reply_len
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use etherparse::PacketBuilder;

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn v4_request(payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .udp(40000, 7777);
        let mut out = Vec::new();
        builder.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn ipv4_reply_has_swapped_headers_and_valid_checksums() {
        let mut frame = v4_request(b"0123456789abcdef");
        let loc = UdpFrame::locate(&frame).unwrap();
        assert_eq!(loc.payload_len, 16);
        frame[loc.payload_offset..loc.payload_offset + 16].copy_from_slice(b"FEDCBA9876543210");
        let len = loc.into_reply(&mut frame, 16);
        let reply = SlicedPacket::from_ethernet(&frame[..len]).unwrap();
        let expected = {
            let builder = PacketBuilder::ethernet2(SERVER_MAC, CLIENT_MAC)
                .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
                .udp(7777, 40000);
            let mut out = Vec::new();
            builder.write(&mut out, b"FEDCBA9876543210").unwrap();
            out
        };
        // etherparse's builder computes both checksums independently of into_reply.
        assert_eq!(&frame[..len], &expected[..]);
        assert!(matches!(reply.transport, Some(TransportSlice::Udp(_))));
    }

    #[test]
    fn ipv6_and_vlan_frames_are_handled() {
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
            .single_vlan(etherparse::VlanId::try_new(42).unwrap())
            .ipv6([1; 16], [2; 16], 64)
            .udp(40000, 7777);
        let mut frame = Vec::new();
        builder.write(&mut frame, &[9u8; 20]).unwrap();
        let loc = UdpFrame::locate(&frame).unwrap();
        let len = loc.into_reply(&mut frame, 20);
        let expected = {
            let builder = PacketBuilder::ethernet2(SERVER_MAC, CLIENT_MAC)
                .single_vlan(etherparse::VlanId::try_new(42).unwrap())
                .ipv6([2; 16], [1; 16], 64)
                .udp(7777, 40000);
            let mut out = Vec::new();
            builder.write(&mut out, &[9u8; 20]).unwrap();
            out
        };
        assert_eq!(&frame[..len], &expected[..]);
    }

    #[test]
    fn shorter_reply_fixes_lengths() {
        let mut frame = v4_request(&[1u8; 40]);
        let loc = UdpFrame::locate(&frame).unwrap();
        let len = loc.into_reply(&mut frame, 10);
        let reply = SlicedPacket::from_ethernet(&frame[..len]).unwrap();
        let Some(TransportSlice::Udp(udp)) = reply.transport else {
            panic!()
        };
        assert_eq!(udp.payload(), &[1u8; 10]);
        assert!(len < v4_request(&[1u8; 40]).len());
    }

    #[test]
    fn non_udp_and_garbage_are_not_located() {
        assert_eq!(UdpFrame::locate(&[]), None);
        assert_eq!(UdpFrame::locate(&[0u8; 60]), None);
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .tcp(1, 2, 3, 4);
        let mut tcp = Vec::new();
        builder.write(&mut tcp, b"x").unwrap();
        assert_eq!(UdpFrame::locate(&tcp), None);
        let frame = v4_request(b"abc");
        for cut in 0..frame.len() - 3 {
            // Truncated frames never locate a payload beyond their end.
            if let Some(loc) = UdpFrame::locate(&frame[..cut]) {
                assert!(loc.payload_offset + loc.payload_len <= cut);
            }
        }
    }
}
