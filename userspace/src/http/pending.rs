//! The memory partial HTTP requests hold, bounded for the whole process: every connection's buffer
//! of not-yet-complete request bytes is charged to one budget by its capacity, and a connection
//! whose buffer would take the total past the limit is refused (503) instead of allocated.
//!
//! Without the bound, 5,000 clients each trickling a 64 KiB body held about 330 MB. Whole
//! requests that arrive in one read are answered from the worker's read buffer and never charged.

use std::sync::atomic::{AtomicU64, Ordering};

use super::request::{MAX_BODY, MAX_HEAD};

/// Bytes buffered by partial requests, counted against one process-wide limit.
#[derive(Debug)]
pub struct PendingBudget {
    limit: AtomicU64,
    used: AtomicU64,
}

impl PendingBudget {
    /// The default limit: 16 MiB, about 230 partial requests of the largest size (72 KiB).
    pub const DEFAULT_LIMIT: u64 = 16 << 20;

    pub fn new(limit: u64) -> PendingBudget {
        PendingBudget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
        }
    }

    /// Sets the limit (the server does it once, at start).
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `n` more bytes if the total stays within the limit; false (nothing charged) if not.
    fn try_charge(&self, n: u64) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    fn force_charge(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(n))
            });
    }
}

impl Default for PendingBudget {
    fn default() -> PendingBudget {
        PendingBudget::new(PendingBudget::DEFAULT_LIMIT)
    }
}

/// The largest buffer one request needs; growth doubles up to it (pipelined bytes may need more).
const LARGEST_REQUEST: usize = MAX_HEAD + MAX_BODY;
/// A buffer this large and mostly unused after a request is shrunk to what it holds.
const SHRINK_ABOVE: usize = 16 * 1024;

/// One connection's partial-request bytes. Its capacity is always exactly what it has charged to
/// the budget, so the owner must call [`PartialBuf::release`] before dropping it.
#[derive(Debug, Default)]
pub struct PartialBuf(Vec<u8>);

impl PartialBuf {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Bytes charged to the budget (the buffer's capacity).
    pub fn charged(&self) -> usize {
        self.0.capacity()
    }

    /// Appends `bytes`, growing the buffer only within the budget. False, with nothing appended
    /// or allocated, when the budget cannot cover the growth.
    #[must_use]
    pub fn append(&mut self, budget: &PendingBudget, bytes: &[u8]) -> bool {
        let need = self.0.len() + bytes.len();
        let old = self.0.capacity();
        if need > old {
            // Double (fewer copies) when the budget allows, else grow to exactly what is needed.
            let doubled = need.max(old.saturating_mul(2).min(LARGEST_REQUEST));
            let Some(target) = [doubled, need]
                .into_iter()
                .find(|&target| budget.try_charge((target - old) as u64))
            else {
                return false;
            };
            self.0.reserve_exact(target - self.0.len());
            // The allocator may hand out more than asked: charge what the buffer really holds.
            budget.force_charge(self.0.capacity().saturating_sub(target) as u64);
        }
        self.0.extend_from_slice(bytes);
        true
    }

    /// Drops the first `n` bytes (requests answered). An empty buffer is freed, a mostly unused
    /// large one shrunk, and the budget gets the difference back.
    pub fn consume(&mut self, budget: &PendingBudget, n: usize) {
        self.0.drain(..n.min(self.0.len()));
        let old = self.0.capacity();
        if self.0.is_empty() {
            self.0 = Vec::new();
        } else if old > SHRINK_ABOVE && self.0.len() * 4 < old {
            self.0.shrink_to(self.0.len());
        }
        budget.release(old.saturating_sub(self.0.capacity()) as u64);
    }

    /// Frees the buffer and gives its whole charge back.
    pub fn release(&mut self, budget: &PendingBudget) {
        budget.release(self.0.capacity() as u64);
        self.0 = Vec::new();
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_budget_tracks_capacity_through_growth_and_release() {
        let budget = PendingBudget::new(1 << 20);
        let mut buf = PartialBuf::default();
        assert!(buf.append(&budget, b"GET / HT"));
        assert_eq!(budget.used(), buf.charged() as u64);
        for _ in 0..1000 {
            assert!(buf.append(&budget, b"X-Pad: abcdefgh\r\n"));
            assert_eq!(budget.used(), buf.charged() as u64);
        }
        assert!(buf.charged() >= buf.len());
        buf.consume(&budget, buf.len() - 3);
        assert_eq!(buf.bytes(), b"h\r\n");
        assert_eq!(budget.used(), buf.charged() as u64);
        assert!(
            buf.charged() < SHRINK_ABOVE,
            "a mostly unused buffer shrinks"
        );
        buf.consume(&budget, 3);
        assert_eq!((buf.charged(), budget.used()), (0, 0));
        assert!(buf.append(&budget, b"x"));
        buf.release(&budget);
        assert_eq!((buf.charged(), budget.used()), (0, 0));
    }

    #[test]
    fn growth_past_the_limit_is_refused_without_allocating() {
        let budget = PendingBudget::new(100);
        let mut a = PartialBuf::default();
        let mut b = PartialBuf::default();
        assert!(a.append(&budget, &[b'a'; 60]));
        assert!(!b.append(&budget, &[b'b'; 41]));
        assert_eq!((b.len(), b.charged()), (0, 0));
        assert!(b.append(&budget, &[b'b'; 40]));
        assert_eq!(budget.used(), 100);
        // Growing `a` now needs budget the others hold.
        assert!(!a.append(&budget, b"more"));
        assert_eq!(a.len(), 60);
        b.release(&budget);
        // Doubling to 120 would not fit: it grows to exactly what it needs.
        assert!(a.append(&budget, b"more"));
        assert_eq!((a.charged(), budget.used()), (64, 64));
    }

    #[test]
    fn buffers_grow_by_doubling_up_to_the_largest_request() {
        let budget = PendingBudget::new(u64::MAX);
        let mut buf = PartialBuf::default();
        let mut reallocations = 0;
        for _ in 0..LARGEST_REQUEST / 100 {
            let before = buf.charged();
            assert!(buf.append(&budget, &[0u8; 100]));
            reallocations += usize::from(buf.charged() != before);
        }
        assert!(reallocations < 16, "{reallocations} reallocations");
        assert!(buf.charged() <= LARGEST_REQUEST);
        buf.release(&budget);
    }
}
