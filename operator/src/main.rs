//! `ferry-operator`: parses flags (a bad one is a one-line error and exit code 2), sets up
//! logging and runs the operator.

use ferry_operator::config::{Config, ParseOutcome};

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
    if let Err(err) = ferry_operator::init_logging(&config) {
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
    if let Err(err) = ferry_operator::run(config).await {
        // The outermost context says what failed, the root cause why; kube's own messages
        // already repeat their sources, so the full chain would be a wall of text.
        let root = err.root_cause().to_string();
        if root == err.to_string() {
            eprintln!("error: {err}");
        } else {
            eprintln!("error: {err}: {root}");
        }
        std::process::exit(1);
    }
}
