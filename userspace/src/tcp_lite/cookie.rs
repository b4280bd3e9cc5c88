//! SYN cookies: the server's initial sequence number encodes everything it needs to accept the
//! third ACK, so a SYN creates no state (a SYN flood fills no table).
//!
//! A cookie is 32 bits: a 5-bit time slot (64 seconds each, modulo 32), a 3-bit index into
//! [`MSS_TABLE`] (the MSS the SYN-ACK offered) and 24 bits of SipHash-1-3, keyed with a secret the
//! datapath draws at start, over the flow, the client's initial sequence number and the full slot.
//! A cookie is accepted for two slots (64 to 128 seconds); a guess succeeds with odds of 2^-24 per
//! segment, as with Linux's own cookies.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use super::Flow;

/// The MSS values a SYN-ACK may offer, smallest first. Each is a multiple of 16, so a segment of a
/// full MSS carries whole counter frames.
pub const MSS_TABLE: [u16; 8] = [256, 512, 528, 1024, 1216, 1440, 1456, 3008];

/// Seconds per cookie time slot.
const SLOT_SECONDS: u32 = 64;

/// A cookie secret: the datapath draws one at start, and each worker uses its own derivation
/// ([`Cookies::for_worker`]), because each keeps its own connections.
#[derive(Clone)]
pub struct Cookies {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for Cookies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.write_str("Cookies(..)")
    }
}

/// The index of the largest entry of [`MSS_TABLE`] not above `mss` (the smallest entry if none is).
pub fn mss_index(mss: u16) -> u8 {
    MSS_TABLE.iter().rposition(|&m| m <= mss).unwrap_or(0) as u8
}

impl Cookies {
    pub fn new(key: [u8; 16]) -> Cookies {
        let (k0, k1) = key.split_at(8);
        Cookies {
            k0: u64::from_le_bytes(k0.try_into().expect("8 bytes")),
            k1: u64::from_le_bytes(k1.try_into().expect("8 bytes")),
        }
    }

    /// The secret of one worker: its own, derived from the datapath's, so a cookie made by one
    /// worker never checks out on another. A flow that moves to another queue is then refused,
    /// never fed to the core a second time by a worker that has no record of it.
    pub fn for_worker(&self, worker: u32) -> Cookies {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write_u32(worker);
        Cookies {
            k0: self.k0 ^ h.finish(),
            k1: self.k1,
        }
    }

    fn hash(&self, flow: &Flow, client_isn: u32, slot: u32) -> u32 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(&flow.client);
        h.write(&flow.server);
        h.write_u16(flow.client_port);
        h.write_u16(flow.server_port);
        h.write_u8(u8::from(flow.ipv6));
        h.write_u32(client_isn);
        h.write_u32(slot);
        (h.finish() as u32) & 0x00ff_ffff
    }

    /// The server's initial sequence number for a SYN with `client_isn`, at `now` (seconds).
    pub fn make(&self, flow: &Flow, client_isn: u32, now: u32, mss_index: u8) -> u32 {
        let slot = now / SLOT_SECONDS;
        ((slot & 31) << 27) | (u32::from(mss_index & 7) << 24) | self.hash(flow, client_isn, slot)
    }

    /// The MSS index of `cookie` if it was made for this flow and `client_isn` in the current or
    /// the previous time slot.
    pub fn check(&self, flow: &Flow, client_isn: u32, cookie: u32, now: u32) -> Option<u8> {
        let current = now / SLOT_SECONDS;
        (0..2).find_map(|age| {
            let slot = current.checked_sub(age)?;
            let matches = slot & 31 == cookie >> 27
                && self.hash(flow, client_isn, slot) == cookie & 0x00ff_ffff;
            matches.then_some(((cookie >> 24) & 7) as u8)
        })
    }
}

/// A fresh random cookie secret, from the kernel's random source.
pub fn random_secret() -> std::io::Result<[u8; 16]> {
    let mut key = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    Ok(key)
}

#[cfg(test)]
mod test {
    use super::*;

    fn flow(port: u16) -> Flow {
        crate::tcp_lite::lab_flow(port)
    }

    #[test]
    fn a_cookie_checks_out_for_its_flow_isn_and_two_slots_only() {
        let jar = Cookies::new(*b"0123456789abcdef");
        let cookie = jar.make(&flow(40000), 1000, 100, 6);
        assert_eq!(jar.check(&flow(40000), 1000, cookie, 100), Some(6));
        assert_eq!(jar.check(&flow(40000), 1000, cookie, 127), Some(6));
        assert_eq!(jar.check(&flow(40000), 1000, cookie, 191), Some(6));
        assert_eq!(jar.check(&flow(40000), 1000, cookie, 192), None, "too old");
        assert_eq!(
            jar.check(&flow(40001), 1000, cookie, 100),
            None,
            "other port"
        );
        assert_eq!(
            jar.check(&flow(40000), 1001, cookie, 100),
            None,
            "other ISN"
        );
        assert_eq!(jar.check(&flow(40000), 1000, cookie ^ 1, 100), None);
        let other = Cookies::new(*b"0123456789abcdeX");
        assert_eq!(
            other.check(&flow(40000), 1000, cookie, 100),
            None,
            "other key"
        );
        // The same SYN again gets the same cookie (a retransmitted SYN is answered alike).
        assert_eq!(jar.make(&flow(40000), 1000, 100, 6), cookie);
        // Each worker has its own secret: a flow that moves to another worker is refused.
        let (w0, w1) = (jar.for_worker(0), jar.for_worker(1));
        let cookie = w0.make(&flow(40000), 1000, 100, 6);
        assert_eq!(w0.check(&flow(40000), 1000, cookie, 100), Some(6));
        assert_eq!(w1.check(&flow(40000), 1000, cookie, 100), None);
    }

    #[test]
    fn the_offered_mss_is_the_largest_table_entry_that_fits() {
        assert_eq!(MSS_TABLE[usize::from(mss_index(1460))], 1456);
        assert_eq!(MSS_TABLE[usize::from(mss_index(1440))], 1440);
        assert_eq!(MSS_TABLE[usize::from(mss_index(536))], 528);
        assert_eq!(MSS_TABLE[usize::from(mss_index(65495))], 3008);
        assert_eq!(MSS_TABLE[usize::from(mss_index(100))], 256);
        assert!(MSS_TABLE.iter().all(|m| m % 16 == 0));
    }
}
