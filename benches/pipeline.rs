//! Criterion benches for the pieces of the hot path: ring push/pop, a token round trip between
//! two threads over heap-backed rings (the same code that runs over shared memory), and the
//! kernels. Each checks its result before it is timed. `cargo bench`.

use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mk1::layout::RingCtl;
use mk1::ops::{reference, Kernel, Kernels, Op};
use mk1::ring::{RingConsumer, RingProducer};
use mk1::sync::AtomicU64;

struct HeapRing {
    ctl: RingCtl,
    entries: Vec<AtomicU64>,
}

fn heap_ring(cap: usize) -> Arc<HeapRing> {
    Arc::new(HeapRing {
        ctl: RingCtl::new(),
        entries: (0..cap).map(|_| AtomicU64::new(0)).collect(),
    })
}

fn ring_push_pop(c: &mut Criterion) {
    let r = heap_ring(64);
    let mut p = RingProducer::new(&r.ctl, &r.entries).unwrap();
    let mut q = RingConsumer::new(&r.ctl, &r.entries).unwrap();
    p.push(7).unwrap();
    p.flush();
    assert_eq!(q.pop().unwrap(), Some(7));
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("push+flush+pop+release, one thread", |b| {
        b.iter(|| {
            p.push(std::hint::black_box(42)).unwrap();
            p.flush();
            q.pop().unwrap()
        })
    });
    g.finish();
}

/// One token bouncing between two threads through two rings, both sides spinning: the floor
/// for mk1's token round trip (no fill, no op, no verify, no clock reads).
fn ring_round_trip(c: &mut Criterion) {
    let to = heap_ring(8);
    let back = heap_ring(8);
    let stop = Arc::new(AtomicBool::new(false));
    let (to2, back2, stop2) = (to.clone(), back.clone(), stop.clone());
    let echo = std::thread::spawn(move || {
        let mut rx = RingConsumer::new(&to2.ctl, &to2.entries).unwrap();
        let mut tx = RingProducer::new(&back2.ctl, &back2.entries).unwrap();
        while !stop2.load(StdOrdering::Relaxed) {
            if let Some(w) = rx.pop().unwrap() {
                tx.push(w + 1).unwrap();
                tx.flush();
            } else {
                std::hint::spin_loop();
            }
        }
    });
    let mut tx = RingProducer::new(&to.ctl, &to.entries).unwrap();
    let mut rx = RingConsumer::new(&back.ctl, &back.entries).unwrap();
    let mut trip = |x: u64| -> u64 {
        tx.push(x).unwrap();
        tx.flush();
        loop {
            if let Some(w) = rx.pop().unwrap() {
                return w;
            }
            std::hint::spin_loop();
        }
    };
    assert_eq!(trip(1), 2, "the echo thread adds one");
    let mut g = c.benchmark_group("ring");
    g.bench_function("round trip across two threads, spinning", |b| {
        b.iter(|| trip(std::hint::black_box(5)))
    });
    g.finish();
    stop.store(true, StdOrdering::Relaxed);
    echo.join().unwrap();
}

fn kernels(c: &mut Criterion) {
    let n = 32 << 10 >> 2; // 32 KiB of i32: in cache
    let op = Op::default();
    let mut want = vec![0; n];
    reference::fill(9, &mut want);
    reference::apply(op, &mut want);
    let mut g = c.benchmark_group("kernels 32KiB");
    g.throughput(Throughput::Bytes((n * 4) as u64));
    for kernel in Kernel::available() {
        let k = Kernels::new(kernel).unwrap();
        let mut buf = vec![0; n];
        k.fill(9, &mut buf);
        k.apply(op, &mut buf);
        assert_eq!(buf, want, "{kernel} agrees with the reference");
        assert_eq!(k.verify(op, 9, &buf), None);
        g.bench_function(format!("fill/{kernel}"), |b| {
            b.iter(|| k.fill(std::hint::black_box(9), &mut buf))
        });
        g.bench_function(format!("apply/{kernel}"), |b| {
            b.iter(|| k.apply(std::hint::black_box(op), &mut buf))
        });
        k.fill(9, &mut buf);
        k.apply(op, &mut buf);
        g.bench_function(format!("verify/{kernel}"), |b| {
            b.iter(|| k.verify(op, std::hint::black_box(9), &buf))
        });
    }
    g.finish();
}

/// The typed kernels (every dtype but the int32 pipeline's): f32 affine and u8 add over 32 KiB,
/// each kernel checked against the scalar reference before it is timed.
fn typed_kernels(c: &mut Criterion) {
    use mk1::ops::typed::{ElemOp, TypedOp};
    fn group<T: mk1::dtype::Element>(c: &mut Criterion, name: &str, op: ElemOp<T>) {
        let n = (32 << 10) / std::mem::size_of::<T>();
        let op = TypedOp::new(op).unwrap();
        let input: Vec<T> = (0..n as u64).map(T::from_u64).collect();
        let want: Vec<T> = input.iter().map(|&x| op.apply_scalar(x)).collect();
        let mut g = c.benchmark_group(format!("typed kernels 32KiB/{name}"));
        g.throughput(Throughput::Bytes(32 << 10));
        for kernel in Kernel::available() {
            let mut buf = input.clone();
            op.apply(kernel, &mut buf);
            assert!(buf.iter().zip(&want).all(|(a, b)| a.same(*b)), "{kernel}");
            g.bench_function(kernel.name(), |b| b.iter(|| op.apply(kernel, &mut buf)));
        }
        g.finish();
    }
    group(c, "f32 affine", ElemOp::Affine { a: 3.0f32, b: 1.0 });
    group(c, "u8 add", ElemOp::Add(7u8));
    group(
        c,
        "i64 clamp",
        ElemOp::Clamp {
            lo: -5i64,
            hi: 1 << 40,
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = ring_push_pop, ring_round_trip, kernels, typed_kernels
}
criterion_main!(benches);
