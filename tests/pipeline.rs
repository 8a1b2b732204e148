//! The library pipeline across its option space: producers × batching × kernel × size classes.
//! Correctness only: every matrix verified, none lost, counts consistent.

use mk1::{Batch, Config, DispatchKind, Kernel, Stop};

const MK1: &str = env!("CARGO_BIN_EXE_mk1");

fn check(cfg: Config, count: u64) -> mk1::Report {
    let r = cfg
        .clone()
        .stop(Stop::Count(count))
        .worker_exe(MK1)
        .run()
        .expect("starts");
    assert!(r.verified, "{cfg:?}\n{r}");
    assert_eq!(r.matrices, count, "{cfg:?}");
    assert_eq!(r.per_worker.iter().sum::<u64>(), count);
    assert!(r.tokens > 0 && r.tokens <= count);
    assert_eq!(
        (r.worker_restarts, r.worker_faults),
        (0, 0),
        "a clean run has no worker trouble: {r}"
    );
    r
}

#[test]
fn producers_batch_and_kernel_combinations_verify() {
    for kernel in Kernel::available() {
        for producers in [1, 2] {
            for batch in [Batch::Off, Batch::Auto, Batch::Max(5)] {
                let cfg = Config::default()
                    .workers(2)
                    .producers(producers)
                    .max_dim(24)
                    .batch(batch)
                    .kernel(kernel)
                    .pin(mk1::Pin::Off);
                let r = check(cfg, 4000);
                match batch {
                    Batch::Off => assert_eq!(r.matrices_per_token, 1.0),
                    Batch::Max(5) => {
                        assert!(r.matrices_per_token > 1.0 && r.matrices_per_token <= 5.0)
                    }
                    _ => assert!(r.matrices_per_token > 5.0, "auto packs at max-dim 24: {r}"),
                }
            }
        }
    }
}

#[test]
fn size_classes_carry_mixed_large_shapes() {
    let cfg = Config::default()
        .workers(2)
        .max_dim(700)
        .min_dim(1)
        .batch(Batch::Off)
        .inflight(3);
    let plan = cfg.plan().unwrap();
    assert!(plan.layout.classes().len() > 2);
    check(cfg, 400);
}

#[test]
fn batching_large_matrices_on_request() {
    check(
        Config::default()
            .workers(1)
            .max_dim(300)
            .batch(Batch::Max(4)),
        300,
    );
}

#[test]
fn many_producers_few_workers_and_the_reverse() {
    check(
        Config::default()
            .workers(1)
            .producers(3)
            .max_dim(16)
            .dispatch(DispatchKind::LeastLoaded),
        6000,
    );
    check(
        Config::default()
            .workers(4)
            .producers(1)
            .max_dim(16)
            .dispatch(DispatchKind::RoundRobin),
        6000,
    );
}

#[test]
fn exact_count_with_batching_does_not_overshoot() {
    for count in [1, 63, 64, 65, 1000] {
        check(Config::default().workers(1).producers(2).max_dim(8), count);
    }
}

/// One token per worker: every returned token is re-sent at once through a ring of capacity 1,
/// so a ring end that held on to a popped entry would find the ring full (a worker fault).
#[test]
fn a_token_can_come_straight_back_through_a_ring_of_one() {
    for batch in [Batch::Off, Batch::Auto] {
        check(
            Config::default()
                .workers(1)
                .inflight(1)
                .max_dim(4)
                .batch(batch),
            20_000,
        );
        check(
            Config::default()
                .workers(2)
                .producers(2)
                .inflight(1)
                .max_dim(4)
                .batch(batch),
            20_000,
        );
    }
}

#[test]
fn progress_moves_during_a_run_in_both_issue_paths() {
    // The fused one-matrix path and the packed path both report progress while they work,
    // not only at the end.
    for max_dim in [128, 16] {
        let seen = std::sync::Mutex::new(Vec::new());
        let progress = |p: &mk1::Progress| seen.lock().unwrap().push(p.matrices);
        let hooks = mk1::Hooks {
            progress: Some(&progress),
            stop_signal: None,
        };
        let cfg = Config::default()
            .workers(1)
            .max_dim(max_dim)
            .stop(Stop::After(std::time::Duration::from_millis(700)))
            .worker_exe(MK1);
        let r = mk1::run(&cfg, &hooks).expect("starts");
        assert!(r.verified, "{r}");
        let seen = seen.into_inner().unwrap();
        assert!(
            seen.iter().any(|&m| m > 0 && m < r.matrices),
            "progress while running at max-dim {max_dim}: {seen:?} of {}",
            r.matrices
        );
    }
}
