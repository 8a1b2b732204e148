//! Single-producer single-consumer ring of `u64` token words over shared memory.
//!
//! The ring is a [`RingCtl`] (tail and head counters on separate lines) and a power-of-two
//! array of entries: inside the tail's line for capacities up to
//! [`INLINE_CAPACITY`](crate::layout::INLINE_CAPACITY) (so a hand-off moves one cache line),
//! after the control block otherwise. The code here takes the entries as a slice and does not
//! care which. Counters are monotonically increasing `u64`s; the entry for
//! counter `n` is `n & mask`. Each end is a value with `&mut self` methods, claimed once per
//! process, and keeps a private copy of its own counter plus a cache of the other side's, so the
//! common push/pop touches only its own line and the entry.
//!
//! Ordering pairs:
//! - the producer writes an entry (Relaxed), then publishes `tail` with Release in
//!   [`RingProducer::flush`]; the consumer loads `tail` with Acquire and only then reads entries
//!   below it. That pair is what transfers ownership of the slot named by the token.
//! - the consumer publishes `head` with Release in [`RingConsumer::pop`], right after reading
//!   the entry; the producer loads `head` with Acquire before reusing it. The release is not
//!   deferred: a popped token can come straight back through the same ring (the producer
//!   re-sends it as soon as it returns), and a ring sized for every token would look full if
//!   the old entry were still held. The store hits the consumer's own line, which the producer
//!   reads only when the ring looks full, so it costs no cache-line transfer.
//!
//! The other side is another process and is not trusted: every counter read from it is checked
//! (`head <= tail <= head + capacity`, never moving backwards) and a violation is a
//! [`RingError`], never an out-of-bounds access.
//!
//! Must never: block, allocate, or make a syscall.

use crate::layout::RingCtl;
use crate::sync::{AtomicU64, Ordering};

/// The other side of a ring broke its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A counter read from shared memory is impossible given what this side knows.
    #[error("ring counters corrupt: head {head}, tail {tail}, capacity {capacity}")]
    Corrupt {
        /// Head as seen.
        head: u64,
        /// Tail as seen.
        tail: u64,
        /// Ring capacity.
        capacity: u64,
    },
}

/// Push failed; the word comes back to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Every entry is in use. Cannot happen when capacity >= tokens in circulation.
    #[error("ring full")]
    Full(u64),
    /// The consumer published an impossible head.
    #[error(transparent)]
    Corrupt(#[from] RingError),
}

/// The producing end of a ring.
pub struct RingProducer<'a> {
    ctl: &'a RingCtl,
    entries: &'a [AtomicU64],
    mask: u64,
    /// Next counter to write (our own copy of `tail`).
    tail: u64,
    /// Last published `tail`.
    published: u64,
    /// Last `head` we loaded.
    head_cache: u64,
}

/// The consuming end of a ring.
pub struct RingConsumer<'a> {
    ctl: &'a RingCtl,
    entries: &'a [AtomicU64],
    mask: u64,
    /// Next counter to read (our own copy of `head`).
    head: u64,
    /// Last `tail` we loaded (validated).
    tail_cache: u64,
}

fn check(entries: &[AtomicU64]) -> u64 {
    assert!(
        entries.len().is_power_of_two(),
        "ring capacity must be a power of two"
    );
    entries.len() as u64 - 1
}

impl<'a> RingProducer<'a> {
    /// Claims the producing end. The caller guarantees nobody else produces into this ring for
    /// as long as the value lives (one owner per end; see `shm::Segment::ring`).
    pub fn new(ctl: &'a RingCtl, entries: &'a [AtomicU64]) -> Result<Self, RingError> {
        let mask = check(entries);
        // Relaxed: we are the only writer of `tail`, so we read our own last value.
        let tail = ctl.tail.count.load(Ordering::Relaxed);
        let head = ctl.head.count.load(Ordering::Acquire);
        let capacity = mask + 1;
        if head > tail || tail - head > capacity {
            return Err(RingError::Corrupt {
                head,
                tail,
                capacity,
            });
        }
        Ok(RingProducer {
            ctl,
            entries,
            mask,
            tail,
            published: tail,
            head_cache: head,
        })
    }

    /// Claims the producing end of a ring nobody else is using yet or any more (a new run, or a
    /// dead worker's): sets both counters to zero without reading them, so it cannot fail
    /// whatever was written there.
    pub fn reset(ctl: &'a RingCtl, entries: &'a [AtomicU64]) -> Self {
        let mask = check(entries);
        ctl.head.count.store(0, Ordering::Relaxed);
        // Release: publishes the zeroed head with the tail to a consumer attaching later.
        ctl.tail.count.store(0, Ordering::Release);
        RingProducer {
            ctl,
            entries,
            mask,
            tail: 0,
            published: 0,
            head_cache: 0,
        }
    }

    /// Capacity in entries.
    pub fn capacity(&self) -> u64 {
        self.mask + 1
    }

    /// The counter the next [`push`](Self::push) writes at.
    #[inline]
    pub fn position(&self) -> u64 {
        self.tail
    }

    /// How far the consumer has taken entries (its published `head`): entries written at this
    /// counter or later were never popped. For a consumer that died, to tell the entries it
    /// never took from those it may have acted on. A value outside what the consumer can have
    /// published (a corrupt or hostile `head`) counts as everything taken.
    pub fn taken(&self) -> u64 {
        // Acquire pairs with the consumer's Release in `pop`.
        let head = self.ctl.head.count.load(Ordering::Acquire);
        if head < self.head_cache || head > self.published {
            return self.tail;
        }
        head
    }

    /// Writes `word` into the next entry. Not visible to the consumer until [`flush`](Self::flush).
    #[inline]
    pub fn push(&mut self, word: u64) -> Result<(), PushError> {
        if self.tail - self.head_cache > self.mask {
            // Looks full: refresh our view of the consumer. Acquire pairs with the consumer's
            // Release in `pop`, so the entries it popped are no longer being read.
            let head = self.ctl.head.count.load(Ordering::Acquire);
            if head < self.head_cache || head > self.tail {
                return Err(RingError::Corrupt {
                    head,
                    tail: self.tail,
                    capacity: self.capacity(),
                }
                .into());
            }
            self.head_cache = head;
            if self.tail - head > self.mask {
                return Err(PushError::Full(word));
            }
        }
        // Relaxed: the entry is published by the Release store of `tail` in `flush`.
        self.entries[(self.tail & self.mask) as usize].store(word, Ordering::Relaxed);
        self.tail += 1;
        Ok(())
    }

    /// Publishes every pushed entry (Release store of `tail`; pairs with the consumer's Acquire
    /// load in `pop`). Returns whether anything new was published.
    #[inline]
    pub fn flush(&mut self) -> bool {
        if self.tail == self.published {
            return false;
        }
        self.ctl.tail.count.store(self.tail, Ordering::Release);
        self.published = self.tail;
        true
    }
}

impl<'a> RingConsumer<'a> {
    /// Claims the consuming end. The caller guarantees nobody else consumes from this ring for
    /// as long as the value lives.
    pub fn new(ctl: &'a RingCtl, entries: &'a [AtomicU64]) -> Result<Self, RingError> {
        let mask = check(entries);
        // Relaxed: we are the only writer of `head`.
        let head = ctl.head.count.load(Ordering::Relaxed);
        let tail = ctl.tail.count.load(Ordering::Acquire);
        let capacity = mask + 1;
        if head > tail || tail - head > capacity {
            return Err(RingError::Corrupt {
                head,
                tail,
                capacity,
            });
        }
        Ok(RingConsumer {
            ctl,
            entries,
            mask,
            head,
            tail_cache: tail,
        })
    }

    /// The consuming end of a ring that [`RingProducer::reset`] has just zeroed, on the same
    /// side (the coordinator owns both ends of a dead worker's rings while it resets them).
    pub fn after_reset(ctl: &'a RingCtl, entries: &'a [AtomicU64]) -> Self {
        let mask = check(entries);
        ctl.head.count.store(0, Ordering::Relaxed);
        ctl.tail.count.store(0, Ordering::Release);
        RingConsumer {
            ctl,
            entries,
            mask,
            head: 0,
            tail_cache: 0,
        }
    }

    /// Takes the next entry, if any, and frees its place at once (Release store of `head`;
    /// pairs with the producer's Acquire load in `push`).
    #[inline]
    pub fn pop(&mut self) -> Result<Option<u64>, RingError> {
        if self.head == self.tail_cache && !self.refresh()? {
            return Ok(None);
        }
        // Relaxed is enough: the Acquire load of `tail` in `refresh` made this entry's write
        // (sequenced before the producer's Release store of `tail`) visible.
        let word = self.entries[(self.head & self.mask) as usize].load(Ordering::Relaxed);
        self.head += 1;
        self.ctl.head.count.store(self.head, Ordering::Release);
        Ok(Some(word))
    }

    /// Whether the producer has published entries we have not popped (loads `tail` if our
    /// cache says empty).
    #[inline]
    pub fn has_pending(&mut self) -> Result<bool, RingError> {
        Ok(self.head != self.tail_cache || self.refresh()?)
    }

    /// Reloads `tail`; true if there is something to pop.
    fn refresh(&mut self) -> Result<bool, RingError> {
        // Acquire pairs with the producer's Release in `flush`.
        let tail = self.ctl.tail.count.load(Ordering::Acquire);
        if tail < self.tail_cache || tail - self.head > self.mask + 1 {
            return Err(RingError::Corrupt {
                head: self.head,
                tail,
                capacity: self.mask + 1,
            });
        }
        self.tail_cache = tail;
        Ok(tail != self.head)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ring(cap: usize) -> (Box<RingCtl>, Vec<AtomicU64>) {
        let ctl = Box::new(RingCtl::new());
        (ctl, (0..cap).map(|_| AtomicU64::new(0)).collect())
    }

    #[test]
    fn push_pop_wraps_around_many_times() {
        let (ctl, e) = ring(4);
        let mut p = RingProducer::new(&ctl, &e).unwrap();
        let mut c = RingConsumer::new(&ctl, &e).unwrap();
        for round in 0..100u64 {
            for i in 0..3 {
                p.push(round * 10 + i).unwrap();
            }
            assert_eq!(
                c.pop().unwrap(),
                None,
                "unflushed entries must be invisible"
            );
            assert!(p.flush());
            for i in 0..3 {
                assert_eq!(c.pop().unwrap(), Some(round * 10 + i));
            }
            assert_eq!(c.pop().unwrap(), None);
        }
        assert_eq!(ctl.tail.count.load(Ordering::Relaxed), 300);
        assert_eq!(ctl.head.count.load(Ordering::Relaxed), 300);
    }

    #[test]
    fn full_returns_the_word_until_the_consumer_pops() {
        let (ctl, e) = ring(2);
        let mut p = RingProducer::new(&ctl, &e).unwrap();
        let mut c = RingConsumer::new(&ctl, &e).unwrap();
        p.push(1).unwrap();
        p.push(2).unwrap();
        assert_eq!(p.push(3), Err(PushError::Full(3)));
        assert_eq!(c.pop().unwrap(), None, "not published yet");
        p.flush();
        assert_eq!(c.pop().unwrap(), Some(1));
        p.push(3).unwrap(); // the pop freed its entry at once
        assert_eq!(p.push(4), Err(PushError::Full(4)));
        p.flush();
        assert_eq!(c.pop().unwrap(), Some(2));
        assert_eq!(c.pop().unwrap(), Some(3));
        assert_eq!(c.pop().unwrap(), None);
    }

    #[test]
    fn taken_says_which_entries_the_consumer_never_popped() {
        let (ctl, e) = ring(8);
        let mut p = RingProducer::new(&ctl, &e).unwrap();
        let mut c = RingConsumer::new(&ctl, &e).unwrap();
        let at: Vec<u64> = (0..4)
            .map(|w| {
                let pos = p.position();
                p.push(w).unwrap();
                pos
            })
            .collect();
        assert_eq!(at, [0, 1, 2, 3]);
        p.flush();
        p.push(9).unwrap(); // written, never published: never taken either
        assert_eq!(c.pop().unwrap(), Some(0));
        assert_eq!(c.pop().unwrap(), Some(1));
        assert_eq!(p.taken(), 2, "entries at 2, 3 and 4 were never popped");
        // A head the consumer cannot have published (past the published tail, or backwards
        // from what we saw) counts as everything taken.
        ctl.head.count.store(5, Ordering::Relaxed);
        assert_eq!(p.taken(), 5);
        ctl.head.count.store(4, Ordering::Relaxed);
        assert_eq!(p.taken(), 4, "4 was published");
        ctl.head.count.store(6, Ordering::Relaxed);
        assert_eq!(p.taken(), p.position());
    }

    #[test]
    fn consumer_rejects_impossible_tail() {
        let (ctl, e) = ring(4);
        let mut c = RingConsumer::new(&ctl, &e).unwrap();
        ctl.tail.count.store(5, Ordering::Relaxed); // more than capacity ahead of head 0
        assert!(matches!(c.pop(), Err(RingError::Corrupt { tail: 5, .. })));
        ctl.tail.count.store(2, Ordering::Relaxed);
        assert_eq!(c.pop().unwrap(), Some(0));
        ctl.tail.count.store(1, Ordering::Relaxed); // moved backwards
        assert!(c.pop().is_ok(), "cached tail still covers entry 1");
        assert!(matches!(c.pop(), Err(RingError::Corrupt { .. })));
    }

    #[test]
    fn producer_rejects_impossible_head() {
        let (ctl, e) = ring(2);
        let mut p = RingProducer::new(&ctl, &e).unwrap();
        p.push(1).unwrap();
        p.push(2).unwrap();
        p.flush();
        ctl.head.count.store(9, Ordering::Relaxed); // beyond tail
        assert!(matches!(p.push(3), Err(PushError::Corrupt(_))));
    }

    #[test]
    fn reset_ignores_whatever_was_written() {
        let (ctl, e) = ring(4);
        ctl.head.count.store(77, Ordering::Relaxed);
        ctl.tail.count.store(3, Ordering::Relaxed);
        let mut c = RingConsumer::after_reset(&ctl, &e);
        let mut p = RingProducer::reset(&ctl, &e);
        p.push(5).unwrap();
        p.flush();
        assert_eq!(c.pop().unwrap(), Some(5));
    }

    #[test]
    fn attach_rejects_corrupt_counters() {
        let (ctl, e) = ring(4);
        ctl.head.count.store(3, Ordering::Relaxed);
        ctl.tail.count.store(1, Ordering::Relaxed);
        assert!(RingConsumer::new(&ctl, &e).is_err());
        assert!(RingProducer::new(&ctl, &e).is_err());
    }
}
