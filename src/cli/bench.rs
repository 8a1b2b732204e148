//! `mk1 bench`: placeholder until the comparison systems land.

use std::process::ExitCode;

use clap::Args;

/// `mk1 bench` flags.
#[derive(Args, Debug)]
pub struct BenchArgs {}

/// Serves as a bench worker process if asked to (nothing yet).
pub fn bench_child_if_requested() {}

pub fn main(_args: BenchArgs) -> ExitCode {
    super::usage_error("bench is not implemented yet")
}
