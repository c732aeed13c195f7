//! `ferry_build_info{component, version}`: always 1, so dashboards and alerts can tell which
//! release each process runs (and join other series on it).

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The release every ferry binary of this workspace carries.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Registers `ferry_build_info` for `component` (`operator`, `forwarder`).
pub fn register(registry: &mut Registry, component: &str) {
    let info = Family::<Vec<(&'static str, String)>, Gauge>::default();
    info.get_or_create(&vec![
        ("component", component.to_string()),
        ("version", VERSION.to_string()),
    ])
    .set(1);
    registry.register(
        "ferry_build_info",
        "Always 1: the component and release of this process",
        info,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_release_is_a_labelled_one() {
        let mut r = Registry::default();
        register(&mut r, "operator");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(
            text.contains(&format!(
                "ferry_build_info{{component=\"operator\",version=\"{VERSION}\"}} 1"
            )),
            "{text}"
        );
    }
}
