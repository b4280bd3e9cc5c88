//! The checked view of a TCP segment in a received Ethernet frame, and the in-place rewrite of that
//! frame into TCP-lite's answer.
//!
//! [`TcpFrame::locate`] applies the steering program's TCP rules (`is_tcp_for_listener`): Ethernet
//! with up to two VLAN tags, IPv4 with a 20-byte header that is not a fragment or IPv6 whose next
//! header is TCP; then, beyond the program, that the IP packet lies in the frame and the TCP header
//! (options included) in the packet. Anything else is not a segment TCP-lite takes.
//!
//! Sans-IO: bytes in, bytes out. Every checksum of an answer is computed in full (a veth peer leaves
//! the checksums of what it sends partial, so those of requests cannot be verified).

use super::frame::{
    be16, fold, ones_complement_sum, parse_ethernet, Destination, ETHERTYPE_IPV4, ETHERTYPE_IPV6,
    IPV4_FRAGMENT_OFFSET, IPV4_HEADER_LEN, IPV4_MORE_FRAGMENTS, IPV6_HEADER_LEN,
};
use crate::tcp_lite::{Flow, Outgoing, Segment};
use crate::xdp::maps::TRANSPORT_TCP;

const TCP_HEADER_LEN: usize = 20;
const TCP_OPTION_END: u8 = 0;
const TCP_OPTION_NOP: u8 = 1;
const TCP_OPTION_MSS: u8 = 2;
/// The TTL or hop limit of an answer.
const HOP_LIMIT: u8 = 64;

/// Where the parts of a TCP segment are in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFrame {
    ip_offset: usize,
    tcp_offset: usize,
    ipv6: bool,
    payload_offset: usize,
    payload_len: usize,
}

impl TcpFrame {
    /// Locates a whole TCP segment in `frame` (see the module documentation).
    pub fn locate(frame: &[u8]) -> Option<TcpFrame> {
        let (ethertype, ip_offset) = parse_ethernet(frame)?;
        let ip = frame.get(ip_offset..)?;
        let (ipv6, tcp_offset, ip_end) = match ethertype {
            ETHERTYPE_IPV4 => {
                let header = ip.get(..IPV4_HEADER_LEN)?;
                let fragment = u16::from_be_bytes([header[6], header[7]]);
                if header[0] != 0x45
                    || header[9] != TRANSPORT_TCP
                    || fragment & (IPV4_MORE_FRAGMENTS | IPV4_FRAGMENT_OFFSET) != 0
                {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
                (false, ip_offset + IPV4_HEADER_LEN, ip_offset + total)
            }
            ETHERTYPE_IPV6 => {
                let header = ip.get(..IPV6_HEADER_LEN)?;
                if header[0] >> 4 != 6 || header[6] != TRANSPORT_TCP {
                    return None;
                }
                let payload = usize::from(u16::from_be_bytes([header[4], header[5]]));
                let start = ip_offset + IPV6_HEADER_LEN;
                (true, start, start + payload)
            }
            _ => return None,
        };
        let data_offset = usize::from(*frame.get(tcp_offset + 12)? >> 4) * 4;
        let payload_offset = tcp_offset + data_offset;
        if ip_end > frame.len() || data_offset < TCP_HEADER_LEN || payload_offset > ip_end {
            return None;
        }
        Some(TcpFrame {
            ip_offset,
            tcp_offset,
            ipv6,
            payload_offset,
            payload_len: ip_end - payload_offset,
        })
    }

    /// The addresses (source, destination) in the frame's IP header.
    fn addresses<'a>(&self, frame: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        let (at, len) = if self.ipv6 {
            (self.ip_offset + 8, 16)
        } else {
            (self.ip_offset + 12, 4)
        };
        (&frame[at..at + len], &frame[at + len..at + 2 * len])
    }

    /// The destination as the listener table keys it.
    pub(super) fn destination(&self, frame: &[u8]) -> Destination {
        let port = be16(frame, self.tcp_offset + 2).unwrap_or(0);
        Destination::from_frame(TRANSPORT_TCP, self.ipv6, self.addresses(frame).1, port)
    }

    /// The segment, as TCP-lite takes it.
    pub fn segment<'a>(&self, frame: &'a [u8]) -> Segment<'a> {
        let t = &frame[self.tcp_offset..self.payload_offset];
        let (source, destination) = self.addresses(frame);
        let mut flow = Flow {
            client: [0; 16],
            server: [0; 16],
            client_port: u16::from_be_bytes([t[0], t[1]]),
            server_port: u16::from_be_bytes([t[2], t[3]]),
            ipv6: self.ipv6,
        };
        flow.client[..source.len()].copy_from_slice(source);
        flow.server[..destination.len()].copy_from_slice(destination);
        Segment {
            flow,
            seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
            ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
            flags: t[13],
            window: u16::from_be_bytes([t[14], t[15]]),
            mss: mss_option(&t[TCP_HEADER_LEN..]),
            payload: &frame[self.payload_offset..self.payload_offset + self.payload_len],
        }
    }

    /// Rewrites the frame into `answer`, sent back on the same flow: MAC and IP addresses and
    /// ports swapped, VLAN tags kept, a fresh TCP header (with the MSS option on a SYN-ACK), the
    /// answer's payload, and every length and checksum recomputed. `buf` starts with the received
    /// frame and may extend past it (the rest of its UMEM frame). Returns the answer's length, or
    /// None when it does not fit in `buf`.
    pub fn write_answer(&self, buf: &mut [u8], answer: &Outgoing) -> Option<usize> {
        let header_len = TCP_HEADER_LEN + if answer.mss.is_some() { 4 } else { 0 };
        let tcp_len = header_len + answer.payload.len();
        let end = self.tcp_offset + tcp_len;
        if end > buf.len() {
            return None;
        }
        let (macs, _) = buf.split_at_mut(12);
        let (dst, src) = macs.split_at_mut(6);
        dst.swap_with_slice(src);
        self.write_ip_header(buf, tcp_len);
        let t = self.tcp_offset;
        let (client_port, server_port) = (be16(buf, t)?, be16(buf, t + 2)?);
        let header = &mut buf[t..t + header_len];
        header[0..2].copy_from_slice(&server_port.to_be_bytes());
        header[2..4].copy_from_slice(&client_port.to_be_bytes());
        header[4..8].copy_from_slice(&answer.seq.to_be_bytes());
        header[8..12].copy_from_slice(&answer.ack.to_be_bytes());
        header[12] = ((header_len / 4) as u8) << 4;
        header[13] = answer.flags;
        header[14..16].copy_from_slice(&answer.window.to_be_bytes());
        header[16..20].fill(0);
        if let Some(mss) = answer.mss {
            header[20..24].copy_from_slice(&[TCP_OPTION_MSS, 4, (mss >> 8) as u8, mss as u8]);
        }
        buf[t + header_len..end].copy_from_slice(answer.payload);
        let (source, destination) = self.addresses(buf);
        let pseudo = ones_complement_sum(destination, ones_complement_sum(source, 0))
            + u64::from(TRANSPORT_TCP)
            + tcp_len as u64;
        let checksum = !fold(ones_complement_sum(&buf[t..end], pseudo));
        buf[t + 16..t + 18].copy_from_slice(&checksum.to_be_bytes());
        Some(end)
    }

    /// Swaps the IP addresses and sets the lengths, the hop limit and (IPv4) the header checksum.
    fn write_ip_header(&self, buf: &mut [u8], tcp_len: usize) {
        let ip = self.ip_offset;
        if self.ipv6 {
            let (src, dst) = buf[ip + 8..ip + 40].split_at_mut(16);
            src.swap_with_slice(dst);
            buf[ip + 4..ip + 6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
            buf[ip + 7] = HOP_LIMIT;
            return;
        }
        let (src, dst) = buf[ip + 12..ip + 20].split_at_mut(4);
        src.swap_with_slice(dst);
        let total = (IPV4_HEADER_LEN + tcp_len) as u16;
        buf[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
        // Identification 0 with Don't Fragment, as Linux sends TCP.
        buf[ip + 4..ip + 8].copy_from_slice(&[0, 0, 0x40, 0]);
        buf[ip + 8] = HOP_LIMIT;
        buf[ip + 10..ip + 12].fill(0);
        let checksum = !fold(ones_complement_sum(&buf[ip..ip + IPV4_HEADER_LEN], 0));
        buf[ip + 10..ip + 12].copy_from_slice(&checksum.to_be_bytes());
    }
}

/// The MSS option among TCP options, if present and well formed.
fn mss_option(mut options: &[u8]) -> Option<u16> {
    while let [kind, rest @ ..] = options {
        match *kind {
            TCP_OPTION_END => return None,
            TCP_OPTION_NOP => options = rest,
            _ => {
                let len = usize::from(*rest.first()?);
                if len < 2 || len > options.len() {
                    return None;
                }
                if *kind == TCP_OPTION_MSS && len == 4 {
                    return Some(u16::from_be_bytes([options[2], options[3]]));
                }
                options = &options[len..];
            }
        }
    }
    None
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::tcp_lite::{ACK, PSH, SYN};
    use etherparse::{PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn syn_v4() -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .tcp(40000, 7777, 1000, 64240)
            .syn()
            .options(&[
                TcpOptionElement::MaximumSegmentSize(1460),
                TcpOptionElement::SelectiveAcknowledgementPermitted,
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(7),
            ])
            .unwrap()
            .write(&mut out, &[])
            .unwrap();
        out
    }

    #[test]
    fn a_syn_is_located_with_its_mss_and_its_flow() {
        let frame = syn_v4();
        let tcp = TcpFrame::locate(&frame).unwrap();
        let seg = tcp.segment(&frame);
        assert_eq!(seg.mss, Some(1460));
        assert_eq!((seg.seq, seg.flags, seg.window), (1000, SYN, 64240));
        assert_eq!((seg.flow.client_port, seg.flow.server_port), (40000, 7777));
        assert_eq!(&seg.flow.server[..4], &[198, 18, 0, 1]);
        assert!(seg.payload.is_empty());
    }

    #[test]
    fn a_syn_ack_written_in_place_parses_with_valid_checksums() {
        let mut buf = syn_v4();
        buf.resize(256, 0xee);
        let tcp = TcpFrame::locate(&buf[..syn_v4().len()]).unwrap();
        let answer = Outgoing {
            seq: 77,
            ack: 1001,
            flags: SYN | ACK,
            window: 1008,
            mss: Some(1456),
            payload: &[],
        };
        let n = tcp.write_answer(&mut buf, &answer).unwrap();
        let parsed = SlicedPacket::from_ethernet(&buf[..n]).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
            panic!("not IPv4")
        };
        let header = ip.header().to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        assert_eq!(header.source, [198, 18, 0, 1]);
        let Some(TransportSlice::Tcp(t)) = parsed.transport else {
            panic!("not TCP")
        };
        assert_eq!((t.source_port(), t.destination_port()), (7777, 40000));
        assert_eq!((t.sequence_number(), t.acknowledgment_number()), (77, 1001));
        assert!(t.syn() && t.ack() && !t.fin() && !t.rst());
        assert_eq!(t.window_size(), 1008);
        let options: Vec<_> = t.options_iterator().map(|o| o.unwrap()).collect();
        assert_eq!(options, vec![TcpOptionElement::MaximumSegmentSize(1456)]);
        let expected = t
            .to_header()
            .calc_checksum_ipv4_raw([198, 18, 0, 1], [198, 18, 0, 2], t.payload())
            .unwrap();
        assert_eq!(t.checksum(), expected);
    }

    #[test]
    fn an_ipv6_vlan_answer_grows_past_the_request_and_checks_out() {
        let mut request = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
            .single_vlan(etherparse::VlanId::try_new(42).unwrap())
            .ipv6([1; 16], [2; 16], 64)
            .tcp(40000, 7777, 1000, 64240)
            .ack(5)
            .write(&mut request, &[7])
            .unwrap();
        let mut buf = request.clone();
        buf.resize(request.len() + 64, 0);
        let tcp = TcpFrame::locate(&request).unwrap();
        assert_eq!(tcp.segment(&request).payload, &[7]);
        let reply = [9u8; 32];
        let answer = Outgoing {
            seq: 5,
            ack: 1001,
            flags: ACK | PSH,
            window: 976,
            mss: None,
            payload: &reply,
        };
        let n = tcp.write_answer(&mut buf, &answer).unwrap();
        let mut expected = Vec::new();
        PacketBuilder::ethernet2(SERVER_MAC, CLIENT_MAC)
            .single_vlan(etherparse::VlanId::try_new(42).unwrap())
            .ipv6([2; 16], [1; 16], 64)
            .tcp(7777, 40000, 5, 976)
            .ack(1001)
            .psh()
            .write(&mut expected, &reply)
            .unwrap();
        assert_eq!(
            &buf[..n],
            &expected[..],
            "byte for byte what etherparse builds"
        );
        // Too little room: refused, never written out of bounds.
        assert_eq!(tcp.write_answer(&mut buf[..n - 1], &answer), None);
    }

    #[test]
    fn anything_but_a_whole_segment_is_not_located() {
        let frame = syn_v4();
        for cut in 0..frame.len() {
            assert_eq!(TcpFrame::locate(&frame[..cut]), None, "cut at {cut}");
        }
        let mut fragment = frame.clone();
        fragment[20] = 0x20;
        assert_eq!(TcpFrame::locate(&fragment), None);
        let mut short_offset = frame.clone();
        short_offset[14 + 20 + 12] = 0x40;
        assert_eq!(TcpFrame::locate(&short_offset), None);
        assert_eq!(mss_option(&[1, 1, 2, 4, 5, 180]), Some(1460));
        assert_eq!(
            mss_option(&[3, 0, 2, 4, 5, 180]),
            None,
            "a zero length ends the parse"
        );
        assert_eq!(mss_option(&[2, 4, 5]), None);
    }
}
