//! The `ricochet` command line: `serve` runs the responder, `bench` measures one.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ricochet",
    version,
    about = "Linux packet responder: verify, count and answer small requests on kernel sockets or kernel bypass"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the responder.
    Serve(ricochet::serve::ServeArgs),
    /// Load a responder and measure latency and throughput.
    Bench(ricochet::bench::BenchArgs),
    /// Check, apply or revert a hardware profile (hw-profiles/*.toml).
    Hw {
        #[command(subcommand)]
        command: ricochet::hw::HwCommand,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RICOCHET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pprof=warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => ricochet::serve::run(args),
        Command::Bench(args) => ricochet::bench::run(args),
        Command::Hw { command } => ricochet::hw::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ricochet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
