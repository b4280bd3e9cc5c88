//! Wire formats as checked views over bytes: the 16-byte verified counter frame and the sockperf header.
//!
//! A view (`Frame`, `SockperfHeader`) wraps any buffer; `new_checked` validates the length once, so no
//! accessor can panic afterwards. `CounterRepr` is the parsed, high-level form of a counter frame with
//! `parse` and `emit`.

use xxhash_rust::xxh64::xxh64;

/// Length of a counter frame: u64 value, then u64 xxh64 of the value's decimal string.
pub const FRAME_LEN: usize = 16;
/// Shortest datagram sockperf sends: sequence number (u64), flags (u16), message length (u32).
pub const SOCKPERF_HEADER_LEN: usize = 14;
/// The sockperf flag a client sets on a ping that asks for a reply; a reflector clears it.
pub const SOCKPERF_PONG_REQUEST_FLAG: u16 = 0x0001;

mod field {
    use core::ops::Range;
    pub const VALUE: Range<usize> = 0..8;
    pub const HASH: Range<usize> = 8..16;

    pub const SOCKPERF_SEQ: Range<usize> = 0..8;
    pub const SOCKPERF_FLAGS: Range<usize> = 8..10;
    pub const SOCKPERF_LEN: Range<usize> = 10..14;
}

/// Why bytes are not a valid request. Every variant is counted by the datapaths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    #[error("frame is {0} bytes, a counter frame is exactly 16")]
    WrongLength(usize),
    #[error("hash does not match the value's decimal string")]
    BadHash,
    #[error("datagram is {0} bytes, shorter than the 14-byte sockperf header")]
    TooShort(usize),
}

/// Renders `value` in ASCII decimal (no sign, no leading zeros) into `buf`, returning the digits.
///
/// u64::MAX has 20 digits, so a 20-byte buffer always suffices. No allocation.
pub fn decimal(value: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut pos = buf.len();
    let mut rest = value;
    loop {
        pos -= 1;
        buf[pos] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &buf[pos..]
}

/// xxh64 (seed 0) of the value's decimal string: the check half of a counter frame.
pub fn value_hash(value: u64) -> u64 {
    let mut buf = [0u8; 20];
    xxh64(decimal(value, &mut buf), 0)
}

/// A checked view of a 16-byte counter frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking it. Accessors panic if it is shorter than 16 bytes.
    pub const fn new_unchecked(buffer: T) -> Frame<T> {
        Frame { buffer }
    }

    /// Wraps a buffer that must be exactly 16 bytes long (one frame, one datagram).
    pub fn new_checked(buffer: T) -> Result<Frame<T>, WireError> {
        let len = buffer.as_ref().len();
        if len != FRAME_LEN {
            return Err(WireError::WrongLength(len));
        }
        Ok(Frame { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The value field (increment in a request, counter value in a reply).
    pub fn value(&self) -> u64 {
        read_u64(&self.buffer.as_ref()[field::VALUE])
    }

    /// The hash field as sent.
    pub fn hash(&self) -> u64 {
        read_u64(&self.buffer.as_ref()[field::HASH])
    }

    /// Recomputes the hash of the value and compares it with the hash field.
    pub fn verify(&self) -> Result<(), WireError> {
        if value_hash(self.value()) == self.hash() {
            Ok(())
        } else {
            Err(WireError::BadHash)
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    pub fn set_value(&mut self, value: u64) {
        self.buffer.as_mut()[field::VALUE].copy_from_slice(&value.to_be_bytes());
    }

    pub fn set_hash(&mut self, hash: u64) {
        self.buffer.as_mut()[field::HASH].copy_from_slice(&hash.to_be_bytes());
    }
}

/// The parsed form of a counter frame: a verified value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CounterRepr {
    pub value: u64,
}

impl CounterRepr {
    /// Parses and verifies a frame.
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<CounterRepr, WireError> {
        frame.verify()?;
        Ok(CounterRepr {
            value: frame.value(),
        })
    }

    /// Parses and verifies one datagram, which must be exactly one frame.
    pub fn parse_bytes(bytes: &[u8]) -> Result<CounterRepr, WireError> {
        CounterRepr::parse(&Frame::new_checked(bytes)?)
    }

    /// Writes the value and its hash.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut Frame<T>) {
        frame.set_value(self.value);
        frame.set_hash(value_hash(self.value));
    }

    /// The 16 bytes of this frame.
    pub fn to_bytes(self) -> [u8; FRAME_LEN] {
        let mut frame = Frame::new_unchecked([0u8; FRAME_LEN]);
        self.emit(&mut frame);
        frame.into_inner()
    }
}

/// A checked view of the sockperf message header (14 bytes, then padding up to the message length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockperfHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SockperfHeader<T> {
    /// Wraps a buffer of at least 14 bytes.
    pub fn new_checked(buffer: T) -> Result<SockperfHeader<T>, WireError> {
        let len = buffer.as_ref().len();
        if len < SOCKPERF_HEADER_LEN {
            return Err(WireError::TooShort(len));
        }
        Ok(SockperfHeader { buffer })
    }

    pub fn sequence(&self) -> u64 {
        read_u64(&self.buffer.as_ref()[field::SOCKPERF_SEQ])
    }

    pub fn flags(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::SOCKPERF_FLAGS];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// The whole message's length as the header states it (header plus padding).
    pub fn message_len(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::SOCKPERF_LEN];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SockperfHeader<T> {
    pub fn set_flags(&mut self, flags: u16) {
        self.buffer.as_mut()[field::SOCKPERF_FLAGS].copy_from_slice(&flags.to_be_bytes());
    }

    /// Turns a ping into its pong in place: clears the reply-request flag, nothing else.
    pub fn make_pong(&mut self) {
        let flags = self.flags() & !SOCKPERF_PONG_REQUEST_FLAG;
        self.set_flags(flags);
    }
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(bytes);
    u64::from_be_bytes(raw)
}

#[cfg(test)]
mod test {
    use super::*;

    static FRAME_42: [u8; 16] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a, 0x6d, 0xe6, 0xf5, 0xd0, 0x76, 0xd7, 0x42,
        0xb9,
    ];

    #[test]
    fn deconstruct() {
        let frame = Frame::new_checked(&FRAME_42[..]).unwrap();
        assert_eq!(frame.value(), 42);
        assert_eq!(frame.hash(), 0x6de6f5d076d742b9);
        assert_eq!(frame.verify(), Ok(()));
    }

    #[test]
    fn construct() {
        let mut frame = Frame::new_unchecked([0u8; 16]);
        frame.set_value(42);
        frame.set_hash(0x6de6f5d076d742b9);
        assert_eq!(frame.into_inner(), FRAME_42);
    }

    #[test]
    fn parse_and_emit() {
        let repr = CounterRepr::parse_bytes(&FRAME_42).unwrap();
        assert_eq!(repr, CounterRepr { value: 42 });
        assert_eq!(repr.to_bytes(), FRAME_42);
    }

    #[test]
    fn decimal_rendering() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(10, &mut buf), b"10");
        assert_eq!(decimal(u64::MAX, &mut buf), b"18446744073709551615");
    }

    #[test]
    fn wrong_lengths_are_rejected_before_access() {
        assert_eq!(
            Frame::new_checked(&[0u8; 15][..]),
            Err(WireError::WrongLength(15))
        );
        assert_eq!(
            Frame::new_checked(&[0u8; 17][..]),
            Err(WireError::WrongLength(17))
        );
        assert_eq!(
            SockperfHeader::new_checked(&[0u8; 13][..]),
            Err(WireError::TooShort(13))
        );
    }

    #[test]
    fn sockperf_pong() {
        // Seen with sockperf 3.7: ping flags 0x0003 are answered with 0x0002.
        let mut ping = *b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x03\x00\x00\x00\x10\x9a\x66";
        let mut header = SockperfHeader::new_checked(&mut ping[..]).unwrap();
        assert_eq!(header.sequence(), 1);
        assert_eq!(header.message_len(), 16);
        header.make_pong();
        assert_eq!(
            &ping,
            b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x02\x00\x00\x00\x10\x9a\x66"
        );
    }
}
