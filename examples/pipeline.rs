//! A complete program that runs an mk1 pipeline through the library.
//!
//! `cargo run --release --example pipeline -- [max_dim] [count]`

use std::time::Duration;

fn main() {
    // Workers are this program re-executed: in a worker this call serves and exits.
    mk1::run_if_worker();

    let mut args = std::env::args().skip(1);
    let max_dim: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);

    let config = mk1::Config::default()
        .workers(2)
        .max_dim(max_dim)
        .op("affine:3,1".parse().expect("a valid op"))
        .stop(mk1::Stop::Count(count))
        .worker_timeout(Duration::from_secs(5));
    match config.run() {
        Ok(report) => {
            println!("{report}");
            std::process::exit(i32::from(report.exit_code()));
        }
        Err(e) => {
            eprintln!("pipeline: {e}");
            std::process::exit(2);
        }
    }
}
