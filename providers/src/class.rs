//! Which Services are this operator's: `type: LoadBalancer` with our `loadBalancerClass`, or
//! with no class when we are the cluster's default implementation.

/// Held on every Service ferry provisions for, removed once its balancer is gone.
pub const FINALIZER: &str = "ferry.dev/load-balancer";

use k8s_openapi::api::core::v1::Service;

#[derive(Clone, Debug)]
pub struct ClassFilter {
    pub class: String,
    pub default_class: bool,
}

impl ClassFilter {
    pub fn owns(&self, svc: &Service) -> bool {
        let Some(spec) = svc.spec.as_ref() else {
            return false;
        };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            return false;
        }
        match spec.load_balancer_class.as_deref() {
            Some(class) => class == self.class,
            None => self.default_class,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::service;

    fn filter(default_class: bool) -> ClassFilter {
        ClassFilter {
            class: "ferry.dev/local".into(),
            default_class,
        }
    }

    #[test]
    fn ownership_follows_type_and_class() {
        let lb = service("web").lb().port(80, 30080).build();
        assert!(filter(true).owns(&lb));
        assert!(!filter(false).owns(&lb));
        let ours = service("web")
            .lb()
            .class("ferry.dev/local")
            .port(80, 30080)
            .build();
        assert!(filter(false).owns(&ours));
        let theirs = service("web")
            .lb()
            .class("metallb.io/metallb")
            .port(80, 30080)
            .build();
        assert!(!filter(true).owns(&theirs));
        let cluster_ip = service("web").port(80, 0).build();
        assert!(!filter(true).owns(&cluster_ip));
    }
}
