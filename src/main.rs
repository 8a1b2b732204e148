//! The `mk1` command: parse flags, call the library, map the outcome to an exit code.
//! No logic lives here; see `cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    // A worker is this same program re-executed; it never returns from here.
    mk1::run_if_worker();
    cli::bench_child_if_requested();
    cli::main()
}
