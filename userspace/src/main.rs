//! The `ricochet` command line: `serve` runs the responder, `bench` measures one, `hw` applies
//! hardware profiles, `fleet` reads the fleet database.

use std::process::ExitCode;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

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
    Serve(Box<ricochet::serve::ServeArgs>),
    /// Load a responder and measure latency and throughput.
    Bench(ricochet::bench::BenchArgs),
    /// Check, apply or revert a hardware profile (hw-profiles/*.toml).
    Hw {
        #[command(subcommand)]
        command: ricochet::hw::HwCommand,
    },
    /// Read the fleet's per-second history from PostgreSQL (what `serve --fleet` ships).
    Fleet {
        #[command(subcommand)]
        command: ricochet::fleet::FleetCommand,
    },
}

/// Clap's error, but naming the `RICOCHET_*` variable when a bad value came from the environment.
fn exit_on_parse_error(command: &clap::Command, e: clap::Error) -> ! {
    let serve = command
        .find_subcommand("serve")
        .expect("serve is a subcommand");
    match ricochet::serve::settings::blame_environment(serve, &e) {
        Some(name) => {
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default();
            eprintln!("ricochet: {name}: {}", first.trim_start_matches("error: "));
            std::process::exit(2);
        }
        None => e.exit(),
    }
}

/// `serve` with its configuration file merged under the flags and environment.
fn serve(matches: &ArgMatches) -> anyhow::Result<()> {
    let given = matches
        .subcommand_matches("serve")
        .expect("serve was parsed");
    ricochet::serve::run(ricochet::serve::Settings::load(given)?)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RICOCHET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pprof=warn")),
        )
        .init();
    use ricochet::serve::settings;
    let mut command = Cli::command().mut_subcommand("serve", |serve| {
        settings::relaxed(settings::with_environment(serve))
    });
    let matches = command
        .try_get_matches_from_mut(std::env::args_os())
        .unwrap_or_else(|e| exit_on_parse_error(&command, e));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Serve(_) => serve(&matches),
        Command::Bench(args) => ricochet::bench::run(args),
        Command::Hw { command } => ricochet::hw::run(command),
        Command::Fleet { command } => ricochet::fleet::summary::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ricochet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
