//! Prints ferry's CustomResourceDefinitions as YAML:
//! `cargo run -p ferry-crds --bin crdgen > crds/loadbalancerpools.ferry.dev.yaml`.

fn main() {
    match ferry_crds::crds_yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(err) => {
            eprintln!("error: cannot serialize CRDs: {err}");
            std::process::exit(1);
        }
    }
}
