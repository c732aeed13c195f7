//! Which Services are this operator's: `type: LoadBalancer` with our `loadBalancerClass`, or
//! with no class when we are the cluster's default implementation — and which instance
//! provisioned a Service, recorded on the Service itself so that it survives restarts.
//!
//! The record (`ferry.dev/provisioned-by: <class>`) is written in the same patch as the
//! finalizer and removed in the same patch that releases it. Only the instance it names
//! cleans a Service up; an instance that finds another class's record on a Service that is
//! now its own waits until that instance has cleaned up. So several ferry instances (local
//! beside aws, two local ones) share a cluster without touching each other's Services.

use k8s_openapi::api::core::v1::Service;

/// Held on every Service ferry provisions for, removed once its balancer is gone.
pub const FINALIZER: &str = "ferry.dev/load-balancer";

/// The class of the ferry instance that provisioned a Service (and holds its finalizer).
pub const PROVISIONED_BY: &str = "ferry.dev/provisioned-by";

/// The class the local provider serves by default; pools that name no classes serve it.
pub const DEFAULT_LOCAL_CLASS: &str = "ferry.dev/local";

#[derive(Clone, Debug)]
pub struct ClassFilter {
    pub class: String,
    pub default_class: bool,
}

/// Who holds a Service's finalizer, as far as this instance can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provisioner {
    /// No ferry finalizer: nobody has provisioned anything.
    Nobody,
    /// This instance's class is recorded.
    Us,
    /// Another class is recorded: that instance's business alone.
    Other(String),
    /// The finalizer without a record (written before records existed): ownership must be
    /// proven another way (the provider holds something for the Service).
    Unrecorded,
}

impl ClassFilter {
    /// Whether the Service is ours to serve now (its type and class).
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

    /// Who provisioned the Service.
    pub fn provisioner(&self, svc: &Service) -> Provisioner {
        let finalized = svc
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
        match provisioned_by(svc) {
            Some(class) if class == self.class => Provisioner::Us,
            Some(class) => Provisioner::Other(class.to_string()),
            None if finalized => Provisioner::Unrecorded,
            None => Provisioner::Nobody,
        }
    }

    /// Whether this instance holds state for the Service, or may: it serves it now, or it
    /// provisioned it and has not cleaned up yet, or the record is missing and the Service
    /// carries ferry's finalizer (the provider decides by what it holds).
    pub fn may_hold(&self, svc: &Service) -> bool {
        self.owns(svc)
            || matches!(
                self.provisioner(svc),
                Provisioner::Us | Provisioner::Unrecorded
            )
    }
}

/// The class recorded as having provisioned the Service.
pub fn provisioned_by(svc: &Service) -> Option<&str> {
    svc.metadata
        .annotations
        .as_ref()?
        .get(PROVISIONED_BY)
        .map(String::as_str)
        .filter(|c| !c.is_empty())
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

    #[test]
    fn the_record_says_who_provisioned_a_service() {
        let f = filter(true);
        let mut svc = service("web").lb().port(80, 30080).build();
        assert_eq!(f.provisioner(&svc), Provisioner::Nobody);
        svc.metadata.finalizers = Some(vec![FINALIZER.into()]);
        assert_eq!(f.provisioner(&svc), Provisioner::Unrecorded);
        svc.metadata.annotations =
            Some([(PROVISIONED_BY.to_string(), "ferry.dev/aws".to_string())].into());
        assert_eq!(
            f.provisioner(&svc),
            Provisioner::Other("ferry.dev/aws".into())
        );
        // Another class provisioned it and it is no longer ours: nothing to hold.
        svc.spec.as_mut().unwrap().load_balancer_class = Some("ferry.dev/aws".into());
        assert!(!f.may_hold(&svc));
        svc.metadata.annotations =
            Some([(PROVISIONED_BY.to_string(), "ferry.dev/local".to_string())].into());
        assert_eq!(f.provisioner(&svc), Provisioner::Us);
        assert!(f.may_hold(&svc), "ours to clean up");
    }
}
