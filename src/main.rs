//! The `agent-lifecycle` binary: `serve` runs the server; every other
//! subcommand is a client of a running server (or the benchmark tool).

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: memory freed on another thread than
/// the one that allocated it (request buffers, responses, records) goes back
/// without taking an arena lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => match err.downcast_ref::<cli::Exit>() {
            Some(exit) => {
                if !exit.message.is_empty() {
                    eprintln!("error: {}", exit.message);
                }
                ExitCode::from(exit.code)
            }
            None => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}
