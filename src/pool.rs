//! Tokens and the producer's pool of them.
//!
//! A [`Token`] is the right to use one slot: whoever holds the value owns the slot (DESIGN
//! invariant 1). It is neither `Clone` nor `Copy`; it leaves a process only by being turned
//! into a ring word ([`SlotPool::dispatch`] on the producer, [`Token::into_word`] on a worker),
//! which consumes it. A word read from a ring becomes a token again only after validation:
//! `Token::from_untrusted_word` (range) on a worker, [`SlotPool::accept`] (range, ownership,
//! generation, holder) on the producer.
//!
//! [`SlotPool`] is one producer thread's share of the slots: free lists per size class, and a
//! private record of every slot it owns — generation, which worker holds it, when it was sent,
//! and a copy of the descriptor it wrote, which is what verification uses (the shared one may
//! have been scribbled over).

use crate::clock::Ticks;

use crate::layout::Layout;

/// The right to use one slot.
#[derive(Debug, PartialEq, Eq)]
pub struct Token {
    slot: u32,
    generation: u32,
}

/// A ring word that does not name a valid token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadToken {
    /// The slot index is out of range, or not one of this pool's.
    #[error("token word {word:#x} names slot {slot}, which is not a slot of this pool")]
    Slot {
        /// The raw word.
        word: u64,
        /// Its slot index.
        slot: u32,
    },
    /// The slot is not out at the worker whose ring it came from.
    #[error(
        "token for slot {slot} came back from worker {from}, but it is not out at that worker"
    )]
    NotHeld {
        /// Slot.
        slot: u32,
        /// The worker whose ring delivered it.
        from: u32,
    },
    /// The generation does not match the one sent (a stale or duplicated token).
    #[error("token for slot {slot} has generation {got}, expected {want}")]
    Generation {
        /// Slot.
        slot: u32,
        /// Generation in the word.
        got: u32,
        /// Generation sent.
        want: u32,
    },
}

impl Token {
    /// A token for `slot`. Only for code that has just established ownership: pool creation,
    /// validation of a popped word, a holder handing its token on (and forgetting it), and
    /// tests.
    pub(crate) fn assume_owned(slot: u32, generation: u32) -> Token {
        Token { slot, generation }
    }

    /// The slot index.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The generation (bumped each time the producer sends the slot out).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Gives the token up as a ring word: `generation << 32 | slot`.
    pub fn into_word(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.slot)
    }

    fn split(word: u64) -> (u32, u32) {
        (word as u32, (word >> 32) as u32)
    }

    /// A worker's check of a popped word: the slot must exist. (Only the producer knows the
    /// generation it sent, so it checks that on return.)
    pub(crate) fn from_untrusted_word(word: u64, slots: u32) -> Result<Token, BadToken> {
        let (slot, generation) = Token::split(word);
        if slot >= slots {
            return Err(BadToken::Slot { word, slot });
        }
        Ok(Token { slot, generation })
    }
}

/// Where one of the pool's slots is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// In the pool's free list, or in the producer's hands.
    Producer,
    /// Sent to this worker and not yet returned.
    Worker(u32),
}

/// The producer's private record of one slot.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// Generation of the last send.
    pub generation: u32,
    /// Who has it.
    pub holder: Holder,
    /// When it was last sent ([`crate::clock`] ticks).
    pub sent_at: Ticks,
    /// Where in its worker's request ring it was last written (the ring's counter): a worker
    /// that died with its ring's head at or before this never took it.
    pub ring_pos: u64,
}

/// One producer's share of the slots.
pub struct SlotPool {
    /// For every global slot: the index into `records` if this pool owns it, else `u32::MAX`.
    local: Vec<u32>,
    /// Slot index of each record.
    slots: Vec<u32>,
    records: Vec<Record>,
    /// Free tokens per size class.
    free: Vec<Vec<Token>>,
    /// Slots out at each worker.
    out: Vec<u32>,
    /// Class of each record.
    class_of: Vec<u8>,
    /// A class kept for packed maps: [`SlotPool::take`] passes it by.
    reserved: Option<usize>,
}

impl SlotPool {
    /// Producer `p` of `producers` takes an equal share of every class: slots
    /// `first + count*p/P .. first + count*(p+1)/P`.
    pub fn share(layout: &Layout, p: u32, producers: u32) -> SlotPool {
        let total = layout.slots() as usize;
        let classes = layout.classes();
        let mut pool = SlotPool {
            local: vec![u32::MAX; total],
            slots: Vec::new(),
            records: Vec::new(),
            free: (0..classes.len()).map(|_| Vec::new()).collect(),
            out: vec![0; layout.params().workers as usize],
            class_of: Vec::new(),
            reserved: None,
        };
        let now = 0;
        for (ci, c) in classes.iter().enumerate() {
            let n = u64::from(c.count);
            let lo = c.first_slot + (n * u64::from(p) / u64::from(producers)) as u32;
            let hi = c.first_slot + (n * u64::from(p + 1) / u64::from(producers)) as u32;
            for slot in lo..hi {
                pool.local[slot as usize] = pool.records.len() as u32;
                pool.slots.push(slot);
                pool.class_of.push(ci as u8);
                pool.records.push(Record {
                    generation: 0,
                    holder: Holder::Producer,
                    sent_at: now,
                    ring_pos: 0,
                });
                pool.free[ci].push(Token::assume_owned(slot, 0));
            }
        }
        for f in &mut pool.free {
            f.reverse(); // hand out low slots first
        }
        pool
    }

    /// Number of slots this pool owns.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Number of slots a loan can take: those of every class but the reserved one.
    pub fn loanable(&self) -> usize {
        self.loanable_from(0)
    }

    /// Number of slots loans can take of class `min_class` or larger (those an array that
    /// needs `min_class` fits).
    pub fn loanable_from(&self, min_class: usize) -> usize {
        self.class_of
            .iter()
            .filter(|&&c| c as usize >= min_class && Some(c as usize) != self.reserved)
            .count()
    }

    /// Number of free slots, of every class.
    pub fn free(&self) -> usize {
        self.free.iter().map(Vec::len).sum()
    }

    /// Whether the pool owns no slot.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Free tokens in class `c` and above.
    #[cfg(test)]
    pub fn free_at_least(&self, c: usize) -> usize {
        self.free[c..].iter().map(Vec::len).sum()
    }

    /// Whether every slot is back with the producer.
    pub fn all_home(&self) -> bool {
        self.out.iter().all(|&n| n == 0)
    }

    /// Slots out at worker `w`.
    pub fn out_at(&self, w: u32) -> u32 {
        self.out[w as usize]
    }

    /// Slots out at each worker.
    pub fn out_counts(&self) -> &[u32] {
        &self.out
    }

    /// Slots out at any worker.
    pub fn out_total(&self) -> u32 {
        self.out.iter().sum()
    }

    /// Largest class index this pool has slots of.
    #[cfg(test)]
    pub fn largest_class(&self) -> Option<usize> {
        self.class_of.iter().map(|&c| c as usize).max()
    }

    /// Keeps class `c` for [`SlotPool::take_any`]: [`SlotPool::take`] passes it by.
    pub fn reserve(&mut self, c: usize) {
        self.reserved = Some(c);
    }

    /// A free token of the smallest class `>= min_class` that has one, the reserved class
    /// left out.
    pub fn take(&mut self, min_class: usize) -> Option<Token> {
        let reserved = self.reserved;
        self.free
            .iter_mut()
            .enumerate()
            .skip(min_class)
            .filter(|&(c, _)| Some(c) != reserved)
            .find_map(|(_, f)| f.pop())
    }

    /// A free token of the smallest class `>= min_class` that has one, the reserved class
    /// included.
    pub fn take_any(&mut self, min_class: usize) -> Option<Token> {
        self.free[min_class..].iter_mut().find_map(Vec::pop)
    }

    /// Size class index of the token's slot.
    pub fn class_index(&self, token: &Token) -> usize {
        self.class_of[self.local[token.slot as usize] as usize] as usize
    }

    /// Returns a token to the free list.
    pub fn put(&mut self, token: Token) {
        let local = self.local[token.slot as usize] as usize;
        debug_assert_eq!(self.records[local].holder, Holder::Producer);
        self.free[self.class_of[local] as usize].push(token);
    }

    /// The record of the token's slot.
    pub fn record(&self, token: &Token) -> &Record {
        &self.records[self.local[token.slot as usize] as usize]
    }

    /// The record of the token's slot, to fill in.
    pub fn record_mut(&mut self, token: &Token) -> &mut Record {
        &mut self.records[self.local[token.slot as usize] as usize]
    }

    /// Marks the token as sent to worker `w` at `now`, written at `ring_pos` of its request
    /// ring, and turns it into a ring word with a new generation.
    pub fn dispatch(&mut self, token: Token, w: u32, now: Ticks, ring_pos: u64) -> u64 {
        let r = &mut self.records[self.local[token.slot as usize] as usize];
        r.generation = r.generation.wrapping_add(1);
        r.holder = Holder::Worker(w);
        r.sent_at = now;
        r.ring_pos = ring_pos;
        self.out[w as usize] += 1;
        Token::assume_owned(token.slot, r.generation).into_word()
    }

    /// Validates a word that came back on worker `w`'s ring: one of our slots, out at `w`, with
    /// the generation we sent. On success the slot is the producer's again.
    pub fn accept(&mut self, word: u64, w: u32) -> Result<Token, BadToken> {
        let (slot, generation) = Token::split(word);
        let local = *self
            .local
            .get(slot as usize)
            .ok_or(BadToken::Slot { word, slot })?;
        let r = self
            .records
            .get_mut(local as usize)
            .ok_or(BadToken::Slot { word, slot })?;
        if r.holder != Holder::Worker(w) {
            return Err(BadToken::NotHeld { slot, from: w });
        }
        if r.generation != generation {
            return Err(BadToken::Generation {
                slot,
                got: generation,
                want: r.generation,
            });
        }
        r.holder = Holder::Producer;
        self.out[w as usize] -= 1;
        Ok(Token::assume_owned(slot, generation))
    }

    /// Takes back every slot out at worker `w` (which is dead): they are the producer's again.
    pub fn reclaim(&mut self, w: u32) -> Vec<Token> {
        let mut back = Vec::new();
        for (local, r) in self.records.iter_mut().enumerate() {
            if r.holder == Holder::Worker(w) {
                r.holder = Holder::Producer;
                back.push(Token::assume_owned(self.slots[local], r.generation));
            }
        }
        self.out[w as usize] = 0;
        back
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(2, 2, 8, &[(4096, 5), (65536, 3)]).unwrap()
    }

    #[test]
    fn producers_share_every_class_disjointly() {
        let l = layout();
        let a = SlotPool::share(&l, 0, 2);
        let b = SlotPool::share(&l, 1, 2);
        assert_eq!(a.len() + b.len(), 8);
        for s in 0..8 {
            let owners = [&a, &b].iter().filter(|p| p.local[s] != u32::MAX).count();
            assert_eq!(owners, 1, "slot {s}");
        }
        assert_eq!(a.largest_class(), Some(1));
        assert_eq!(b.largest_class(), Some(1));
    }

    #[test]
    fn dispatch_accept_round_trip_checks_generation_and_holder() {
        let l = layout();
        let mut pool = SlotPool::share(&l, 0, 1);
        let t = pool.take(0).unwrap();
        let slot = t.slot();
        let word = pool.dispatch(t, 1, 0, 0);
        assert_eq!(pool.out_at(1), 1);
        assert!(matches!(
            pool.accept(word, 0),
            Err(BadToken::NotHeld { .. })
        ));
        let stale = word - (1 << 32);
        assert!(matches!(
            pool.accept(stale, 1),
            Err(BadToken::Generation { .. })
        ));
        assert!(matches!(pool.accept(99, 1), Err(BadToken::Slot { .. })));
        let back = pool.accept(word, 1).unwrap();
        assert_eq!(back.slot(), slot);
        assert!(
            matches!(pool.accept(word, 1), Err(BadToken::NotHeld { .. })),
            "duplicate"
        );
        pool.put(back);
        assert!(pool.all_home());
    }

    #[test]
    fn take_falls_back_to_a_larger_class() {
        let l = layout();
        let mut pool = SlotPool::share(&l, 0, 1);
        let small: Vec<Token> = (0..5).map(|_| pool.take(0).unwrap()).collect();
        assert!(small.iter().all(|t| t.slot() < 5));
        let big = pool.take(0).unwrap();
        assert!(big.slot() >= 5);
        assert_eq!(pool.free_at_least(0), 2);
    }

    #[test]
    fn take_passes_the_reserved_class_by_and_take_any_does_not() {
        let l = Layout::new(2, 1, 9, &[(4096, 2), (16384, 3), (65536, 4)]).unwrap();
        let mut pool = SlotPool::share(&l, 0, 1);
        pool.reserve(1);
        // Loans: the small class, then past the reserved one to the largest.
        let loans: Vec<Token> = (0..6).map(|_| pool.take(0).unwrap()).collect();
        assert!(
            loans.iter().all(|t| pool.class_index(t) != 1),
            "never reserved"
        );
        assert!(pool.take(0).is_none(), "only reserved slots are left");
        assert!(pool.take(1).is_none());
        // Maps: the reserved class, all three of it.
        for _ in 0..3 {
            let t = pool.take_any(1).unwrap();
            assert_eq!(pool.class_index(&t), 1);
        }
        assert!(pool.take_any(0).is_none());
        assert_eq!((pool.len(), pool.loanable(), pool.free()), (9, 6, 0));
    }

    #[test]
    fn reclaim_returns_exactly_the_dead_workers_slots() {
        let l = layout();
        let mut pool = SlotPool::share(&l, 0, 1);
        let now = 0;
        let mut words = Vec::new();
        for i in 0..6 {
            let t = pool.take(0).unwrap();
            words.push(pool.dispatch(t, i % 2, now, u64::from(i / 2)));
        }
        let back = pool.reclaim(1);
        assert_eq!(back.len(), 3);
        assert_eq!(pool.out_at(1), 0);
        assert_eq!(pool.out_at(0), 3);
        assert!(
            pool.accept(words[1], 1).is_err(),
            "reclaimed tokens are no longer out"
        );
    }

    #[test]
    fn worker_side_range_check() {
        assert!(Token::from_untrusted_word(7, 8).is_ok());
        assert!(Token::from_untrusted_word(8, 8).is_err());
        assert_eq!(Token::assume_owned(3, 9).into_word(), (9 << 32) | 3);
    }
}
