//! `ferry`: the command line; everything is in the library.

fn main() {
    ferry_cli::main();
}
