//! `ferry-forwarder`: parses flags (a bad one is a one-line error and exit code 2), sets up
//! logging and runs the forwarder until SIGTERM.

use ferry_forwarder::config::{Config, ParseOutcome};

#[tokio::main]
async fn main() {
    let config = match Config::parse_args(std::env::args_os()) {
        Ok(c) => c,
        Err(ParseOutcome::Print(text)) => {
            print!("{text}");
            return;
        }
        Err(ParseOutcome::Error(line)) => {
            eprintln!("{line}");
            std::process::exit(2);
        }
    };
    if let Err(err) = ferry_forwarder::init_logging(&config) {
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
    if let Err(err) = ferry_forwarder::run(config).await {
        ferry_runtime::exit_with(&err);
    }
}
