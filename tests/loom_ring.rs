//! Loom models of the ring and the doorbell: every interleaving of two threads (up to loom's
//! bounds) delivers every token exactly once, in order, and never loses a wake-up.
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test --release --test loom_ring`
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use mk1::layout::{Bell, RingCtl};
use mk1::ring::{PushError, RingConsumer, RingProducer};
use mk1::sync::{AtomicU32, AtomicU64, Ordering};
use mk1::wait::{Doorbell, Park};

struct Ring {
    ctl: RingCtl,
    entries: Vec<AtomicU64>,
}

fn ring(cap: usize) -> Arc<Ring> {
    Arc::new(Ring {
        ctl: RingCtl::new(),
        entries: (0..cap).map(|_| AtomicU64::new(u64::MAX)).collect(),
    })
}

/// `inline`: the entries live in the tail's line, as they do in shared memory for small rings.
fn transfer(cap: usize, tokens: u64, inline: bool) {
    loom::model(move || {
        let r = ring(cap);
        let r2 = r.clone();
        let producer = thread::spawn(move || {
            let entries = if inline {
                &r2.ctl.tail.inline[..cap]
            } else {
                &r2.entries[..]
            };
            let mut p = RingProducer::new(&r2.ctl, entries).unwrap();
            for t in 0..tokens {
                loop {
                    match p.push(100 + t) {
                        Ok(()) => break,
                        Err(PushError::Full(_)) => {
                            p.flush();
                            thread::yield_now();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                p.flush();
            }
        });
        let entries = if inline {
            &r.ctl.tail.inline[..cap]
        } else {
            &r.entries[..]
        };
        let mut c = RingConsumer::new(&r.ctl, entries).unwrap();
        let mut got = Vec::new();
        while got.len() < tokens as usize {
            match c.pop().unwrap() {
                Some(w) => {
                    got.push(w);
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, (0..tokens).map(|t| 100 + t).collect::<Vec<_>>());
        assert_eq!(c.pop().unwrap(), None, "nothing delivered twice");
    });
}

#[test]
fn capacity_1_delivers_each_token_once() {
    transfer(1, 3, true);
}

#[test]
fn capacity_2_delivers_each_token_once() {
    transfer(2, 3, false);
    transfer(2, 3, true);
}

/// A park that loom can explore: it spins (yielding) until the word changes. A lost wake-up
/// makes it spin forever, which loom reports as a failure.
struct SpinPark;

impl Park for SpinPark {
    fn wait(&self, word: &AtomicU32, expected: u32, _timeout: std::time::Duration) {
        while word.load(Ordering::Acquire) == expected {
            thread::yield_now();
        }
    }
    fn wake(&self, _word: &AtomicU32) {}
}

#[test]
fn doorbell_never_loses_a_wakeup() {
    loom::model(|| {
        let words = Arc::new((
            Bell {
                word: AtomicU32::new(0),
                sleeping: AtomicU32::new(0),
                cpu: AtomicU32::new(0),
            },
            AtomicU64::new(0),
        ));
        let w2 = words.clone();
        let notifier = thread::spawn(move || {
            // Publish work (as a ring tail would), then ring.
            w2.1.store(1, Ordering::Release);
            Doorbell::new(&w2.0).ring(&SpinPark);
        });
        let bell = Doorbell::new(&words.0);
        while words.1.load(Ordering::Acquire) == 0 {
            bell.sleep(&SpinPark, std::time::Duration::from_secs(1), || {
                words.1.load(Ordering::Acquire) != 0
            });
        }
        notifier.join().unwrap();
    });
}
