use std::process::ExitCode;

use blockwatch::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .parse_env("BLOCKWATCH_LOG")
        .init();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockwatch: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Trace(args) => blockwatch::session::trace::run(args).await,
            Command::Daemon(args) => blockwatch::session::daemon::run(args).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            // One line: the error and its causes, outermost first
            // (anyhow's alternate form joins them with ": ").
            eprintln!("blockwatch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
