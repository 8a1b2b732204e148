use mk1::{Mode, Pool, Producer, Shape, Task};
use std::time::{Duration, Instant};
fn drive(p: &Producer<'_>, task: &Task, dim: u32, dur: Duration) -> f64 {
    let mut seed = 11u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as u32 % dim + 1, (seed >> 45) as u32 % dim + 1)
    };
    let first = p.next_ticket().0;
    let start = Instant::now();
    let deadline = start + dur;
    let mut done = 0u64;
    loop {
        let (r, c) = next();
        let Ok(mut l) = p.try_loan::<f32>(Shape::d2(r, c)) else {
            break;
        };
        let s = p.next_ticket().0 - first;
        l.as_mut_slice().fill(s as f32);
        p.submit(l, task).unwrap();
    }
    while let Some(c) = p.recv() {
        let s = c.ticket().0 - first;
        let o = c.output::<f32>().unwrap();
        assert!(o.as_slice().iter().all(|&x| x == (s as f32) * 3.0 + 1.0));
        done += 1;
        if Instant::now() >= deadline {
            continue;
        }
        let (r, cc) = next();
        let mut l = c.reuse::<f32>(Shape::d2(r, cc)).unwrap();
        let s = p.next_ticket().0 - first;
        l.as_mut_slice().fill(s as f32);
        p.submit(l, task).unwrap();
    }
    done as f64 / start.elapsed().as_secs_f64()
}
fn main() {
    mk1::run_if_worker();
    let dim: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(128);
    let b = |m| {
        Pool::builder()
            .workers(1)
            .producers(2)
            .mode(m)
            .max_array_bytes(4 << 20)
            .slots_per_producer(4)
            .build()
            .unwrap()
    };
    let ip = b(Mode::InPlace);
    let op = b(Mode::OutOfPlace);
    let (pi, po) = (ip.producer().unwrap(), op.producer().unwrap());
    let task = Task::op("affine:3,1").unwrap();
    let mut r = vec![];
    for _ in 0..10 {
        let a = drive(&pi, &task, dim, Duration::from_millis(300));
        let b = drive(&po, &task, dim, Duration::from_millis(300));
        r.push((a, b, b / a));
    }
    let mut q: Vec<f64> = r.iter().map(|x| x.2).collect();
    q.sort_by(|a, b| a.partial_cmp(b).unwrap());
    for x in &r {
        println!("ip {:.0} op {:.0} op/ip {:.2}", x.0, x.1, x.2);
    }
    println!("median op/ip {:.2}", q[q.len() / 2]);
}
