//! `ferry-operator`: parses flags (a bad one is a one-line error and exit code 2), sets up
//! logging and runs the operator.

use ferry_operator::config::Config;

#[tokio::main]
async fn main() {
    let config = ferry_runtime::or_exit(Config::parse_args(std::env::args_os()));
    if let Err(err) = ferry_operator::init_logging(&config) {
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
    if let Err(err) = ferry_operator::run(config).await {
        ferry_runtime::exit_with(&err);
    }
}
