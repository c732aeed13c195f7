//! `kubectl-ferry`: the same command line as a kubectl plugin (`kubectl ferry …`).

fn main() {
    ferry_cli::main();
}
