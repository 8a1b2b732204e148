//! The `mk1` command: parse flags, call the library, map the outcome to an exit code.
//! No logic lives here; see `cli/`.

#[cfg(not(loom))]
mod cli;

#[cfg(not(loom))]
fn main() -> std::process::ExitCode {
    // (First, while this is the only thread: see the function.)
    mk1::sys::one_malloc_arena_under_address_limit();
    // A worker is this same program re-executed; it never returns from here.
    // (With the kernels `mk1 bench library` runs in its pools.)
    mk1::run_if_worker_with(&mk1::bench::library::kernels());
    cli::bench_child_if_requested();
    cli::main()
}

/// Under `--cfg loom` only the protocol modules are built, for the model tests.
#[cfg(loom)]
fn main() {}
