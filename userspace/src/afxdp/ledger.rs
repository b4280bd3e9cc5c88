//! Frame accounting for one AF_XDP socket, sans-IO: where every UMEM frame is, and what became of
//! every received one.
//!
//! A frame is always in exactly one place: the free list (userspace's), the fill or RX ring (the
//! kernel's, waiting for or holding a request), or the TX or completion ring (a reply on its way
//! out). Every received descriptor ends in exactly one outcome: queued for TX as a reply, recycled to
//! the free list (dropped or unanswered, counted by the core), or refused by a full TX ring (counted
//! as a `tx_error`, then recycled). The worker moves frames only through these methods, so the
//! invariant [`FrameLedger::balanced`] can be checked in tests without a socket.

/// What became of received frames, since the socket opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub received: u64,
    pub queued_for_tx: u64,
    pub recycled: u64,
    pub tx_refused: u64,
}

/// The frames of one UMEM and the places they are in.
#[derive(Debug)]
pub struct FrameLedger {
    free: Vec<u64>,
    total: u64,
    /// Handed to the fill ring and not yet received.
    with_kernel_rx: u64,
    /// Queued on the TX ring and not yet completed.
    with_kernel_tx: u64,
    outcomes: Outcomes,
}

impl FrameLedger {
    /// `frame_count` frames of `frame_size` bytes, all free.
    pub fn new(frame_count: u32, frame_size: u32) -> FrameLedger {
        let size = u64::from(frame_size);
        FrameLedger {
            free: (0..u64::from(frame_count)).map(|i| i * size).collect(),
            total: u64::from(frame_count),
            with_kernel_rx: 0,
            with_kernel_tx: 0,
            outcomes: Outcomes::default(),
        }
    }

    /// Frames userspace holds, ready for the fill ring.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// The last `n` free frames (fewer if fewer are free), to be written to the fill ring in this
    /// order; [`FrameLedger::filled`] hands over those the ring took.
    pub fn fill_candidates(&self, n: usize) -> &[u64] {
        &self.free[self.free.len() - n.min(self.free.len())..]
    }

    /// The fill ring took the first `inserted` of the `candidates` frames last offered.
    pub fn filled(&mut self, candidates: usize, inserted: usize) {
        let start = self.free.len() - candidates.min(self.free.len());
        let end = (start + inserted).min(self.free.len());
        self.with_kernel_rx += (end - start) as u64;
        self.free.drain(start..end);
    }

    /// `n` descriptors came off the RX ring.
    pub fn received(&mut self, n: usize) {
        self.with_kernel_rx = self.with_kernel_rx.saturating_sub(n as u64);
        self.outcomes.received += n as u64;
    }

    /// A received frame that is not answered goes back to the free list.
    pub fn recycle(&mut self, addr: u64) {
        self.free.push(addr);
        self.outcomes.recycled += 1;
    }

    /// `n` replies went on the TX ring.
    pub fn queued_for_tx(&mut self, n: usize) {
        self.with_kernel_tx += n as u64;
        self.outcomes.queued_for_tx += n as u64;
    }

    /// Replies the TX ring would not take: their frames go back to the free list.
    pub fn tx_refused(&mut self, addrs: impl Iterator<Item = u64>) {
        for addr in addrs {
            self.free.push(addr);
            self.outcomes.tx_refused += 1;
        }
    }

    /// A transmitted frame came back on the completion ring.
    pub fn completed(&mut self, addr: u64) {
        self.free.push(addr);
        self.with_kernel_tx = self.with_kernel_tx.saturating_sub(1);
    }

    pub fn outcomes(&self) -> Outcomes {
        self.outcomes
    }

    /// Every frame is in one place, and every received frame has exactly one outcome (frames of
    /// the batch in hand, `in_hand`, have none yet).
    pub fn balanced(&self, in_hand: u64) -> bool {
        let o = self.outcomes;
        let places = self.free.len() as u64 + self.with_kernel_rx + self.with_kernel_tx + in_hand;
        places == self.total && o.received == o.queued_for_tx + o.recycled + o.tx_refused + in_hand
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn frames_start_free_at_frame_aligned_addresses() {
        let ledger = FrameLedger::new(4, 2048);
        assert_eq!(ledger.fill_candidates(8), &[0, 2048, 4096, 6144]);
        assert!(ledger.balanced(0));
    }

    #[test]
    fn every_received_frame_ends_in_exactly_one_outcome() {
        let mut ledger = FrameLedger::new(8, 2048);
        ledger.filled(8, 8);
        assert_eq!(ledger.free_count(), 0);
        // A batch of five: two answered, two dropped, one refused by a full TX ring.
        ledger.received(5);
        assert!(ledger.balanced(5));
        ledger.queued_for_tx(2);
        ledger.recycle(4096);
        ledger.recycle(6144);
        assert!(
            !ledger.balanced(0),
            "one frame of the batch has no outcome yet"
        );
        ledger.tx_refused([8192].into_iter());
        assert!(ledger.balanced(0));
        let o = ledger.outcomes();
        assert_eq!(
            (o.received, o.queued_for_tx, o.recycled, o.tx_refused),
            (5, 2, 2, 1)
        );
        // The two replies complete; every frame is accounted for again.
        ledger.completed(0);
        ledger.completed(2048);
        assert_eq!(ledger.free_count(), 5);
        assert!(ledger.balanced(0));
    }

    #[test]
    fn a_partial_fill_hands_over_only_what_the_ring_took() {
        let mut ledger = FrameLedger::new(4, 4096);
        assert_eq!(ledger.fill_candidates(2), &[8192, 12288]);
        // The ring took the first of the two offered.
        ledger.filled(2, 1);
        assert_eq!(ledger.free_count(), 3);
        assert_eq!(ledger.fill_candidates(4), &[0, 4096, 12288]);
        assert!(ledger.balanced(0));
    }

    #[test]
    fn a_lost_or_duplicated_frame_unbalances_the_ledger() {
        let mut ledger = FrameLedger::new(2, 2048);
        ledger.filled(2, 2);
        ledger.received(1);
        ledger.recycle(0);
        ledger.recycle(0);
        assert!(!ledger.balanced(0));
    }
}
