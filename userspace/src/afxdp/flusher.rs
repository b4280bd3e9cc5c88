//! When an AF_XDP worker kicks the kernel to transmit (a `sendto()` on the socket), as a policy
//! object that tests drive without a socket. Firedancer's `fd_net_flusher_t` is the model: the loop
//! reports what it did, the policy says when a kick is due.
//!
//! A kick is a syscall, the largest cost per batch on a copy-mode socket, so the policy kicks only
//! when the kernel asks for it (the TX ring's need_wakeup flag, set since Linux 5.4 when bound with
//! XDP_USE_NEED_WAKEUP) and never for an empty ring.

/// Copy-mode sockets transmit at most this many descriptors per kick: the kernel's TX_BATCH_SIZE
/// (net/xdp/xsk.c), which has been 32 since AF_XDP appeared in Linux 4.18. A batch larger than that
/// needs several kicks or the rest waits for the next batch's kick, adding a whole turn of latency.
pub const COPY_MODE_TX_PER_KICK: u32 = 32;

/// Kicks to try while the TX ring stays full before the replies that do not fit are counted as
/// `tx_errors`. Each kick in copy mode drains up to 32 descriptors, so 64 kicks are room for 2,048
/// replies: more than any ring this worker configures by default (1,024), so a ring that is still
/// full after them is stuck, not slow, and the worker must not spin on it forever.
pub const MAX_FULL_RING_KICKS: u32 = 64;

/// The TX kick policy of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxFlusher {
    zero_copy: bool,
    full_ring_kicks: u32,
}

impl TxFlusher {
    pub fn new(zero_copy: bool) -> TxFlusher {
        TxFlusher {
            zero_copy,
            full_ring_kicks: 0,
        }
    }

    /// A new batch of replies starts: the full-ring budget is fresh.
    pub fn start_batch(&mut self) {
        self.full_ring_kicks = 0;
    }

    /// The TX ring took only part of the batch. True: kick (and reap completions) and try again;
    /// false: give up on the rest of this batch.
    pub fn retry_full_ring(&mut self) -> bool {
        if self.full_ring_kicks == MAX_FULL_RING_KICKS {
            return false;
        }
        self.full_ring_kicks += 1;
        true
    }

    /// The most kicks to make once the batch is on the ring, with `pending` descriptors not yet
    /// consumed by the kernel. Zero-copy: one, the driver transmits on its own. Copy mode transmits
    /// synchronously inside the kick, 32 at a time: enough kicks to drain the ring, plus one (the
    /// caller stops early when the ring is empty).
    pub fn kicks_after_batch(&self, needs_wakeup: bool, pending: u32) -> u32 {
        match (needs_wakeup, pending, self.zero_copy) {
            (false, _, _) | (_, 0, _) => 0,
            (true, _, true) => 1,
            (true, pending, false) => pending.div_ceil(COPY_MODE_TX_PER_KICK) + 1,
        }
    }

    /// A spinning worker with nothing received: kick only if replies wait and the kernel asked.
    pub fn kick_when_idle(&self, needs_wakeup: bool, pending: u32) -> bool {
        needs_wakeup && pending > 0
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn no_kick_unless_the_kernel_asks_and_something_waits() {
        for zero_copy in [false, true] {
            let flusher = TxFlusher::new(zero_copy);
            assert_eq!(flusher.kicks_after_batch(false, 10), 0);
            assert_eq!(flusher.kicks_after_batch(true, 0), 0);
            assert!(!flusher.kick_when_idle(false, 3));
            assert!(!flusher.kick_when_idle(true, 0));
            assert!(flusher.kick_when_idle(true, 3));
        }
    }

    #[test]
    fn copy_mode_kicks_until_the_ring_can_drain_zero_copy_once() {
        let copy = TxFlusher::new(false);
        assert_eq!(copy.kicks_after_batch(true, 1), 2);
        assert_eq!(copy.kicks_after_batch(true, 32), 2);
        assert_eq!(copy.kicks_after_batch(true, 33), 3);
        assert_eq!(copy.kicks_after_batch(true, 64), 3);
        let zero_copy = TxFlusher::new(true);
        assert_eq!(zero_copy.kicks_after_batch(true, 1000), 1);
    }

    #[test]
    fn a_full_ring_is_retried_a_bounded_number_of_times_per_batch() {
        let mut flusher = TxFlusher::new(false);
        for _ in 0..MAX_FULL_RING_KICKS {
            assert!(flusher.retry_full_ring());
        }
        assert!(!flusher.retry_full_ring());
        flusher.start_batch();
        assert!(flusher.retry_full_ring());
    }
}
