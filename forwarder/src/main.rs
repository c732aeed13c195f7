//! `ferry-forwarder`: parses flags (a bad one is a one-line error and exit code 2), sets up
//! logging and runs the forwarder until SIGTERM.

use ferry_forwarder::config::Config;

fn main() {
    let config = ferry_runtime::or_exit(Config::parse_args(std::env::args_os()));
    // The I/O driver is asked for events every few task polls rather than tokio's default
    // 61: with many busy connections the workers seldom park, and a relayed request would
    // otherwise wait for its readiness event behind a long run of other tasks.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(EVENT_INTERVAL)
        .build();
    match runtime {
        Ok(rt) => rt.block_on(run(config)),
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            std::process::exit(1);
        }
    }
}

const EVENT_INTERVAL: u32 = 8;

async fn run(config: Config) {
    if let Err(err) = ferry_forwarder::init_logging(&config) {
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
    if let Err(err) = ferry_forwarder::run(config).await {
        ferry_runtime::exit_with(&err);
    }
}
