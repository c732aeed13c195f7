//! How a cloud provider proves a resource is this cluster's: two marks on everything ferry
//! creates, the free-text cluster id (`--cluster-id`, which also scopes names) and this
//! cluster's identity (the `kube-system` namespace UID, which only this cluster's API gives),
//! beside the Service the resource serves. AWS writes them as tags, GCE (whose target pools
//! and firewall rules have no labels) as a JSON description; both read them back through
//! `owner`, and orphan collection deletes only what carries both.

use std::collections::BTreeMap;

use crate::{ClusterIdentity, LoadBalancerId};

pub const TAG_CLUSTER: &str = "ferry.dev/cluster";
pub const TAG_NAMESPACE: &str = "ferry.dev/service-namespace";
pub const TAG_NAME: &str = "ferry.dev/service-name";
pub const TAG_UID: &str = "ferry.dev/service-uid";
/// The cluster's identity (`ClusterIdentity::uid`), the mark a copied `--cluster-id` lacks.
pub const TAG_CLUSTER_UID: &str = "ferry.dev/cluster-uid";

/// The marks of every resource ferry creates for `id` in `cluster`.
pub fn marks(cluster: &ClusterIdentity, id: &LoadBalancerId) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TAG_CLUSTER.to_string(), cluster.id.clone()),
        (TAG_CLUSTER_UID.to_string(), cluster.uid.clone()),
        (TAG_NAMESPACE.to_string(), id.namespace.clone()),
        (TAG_NAME.to_string(), id.name.clone()),
        (TAG_UID.to_string(), id.uid.clone()),
    ])
}

/// Whose a resource is, by its marks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Both marks of this cluster: ferry's resource for this Service.
    Ours(LoadBalancerId),
    /// This cluster's id but another identity (or none): never to be deleted from here.
    Foreign {
        id: LoadBalancerId,
        cluster_uid: Option<String>,
    },
    /// Not ferry's, or another cluster id.
    NotOurs,
}

/// The Service that `marks` name, and whether they carry both marks of `cluster`.
pub fn owner(cluster: &ClusterIdentity, marks: &BTreeMap<String, String>) -> Mark {
    if marks.get(TAG_CLUSTER) != Some(&cluster.id) {
        return Mark::NotOurs;
    }
    let (Some(namespace), Some(name), Some(uid)) = (
        marks.get(TAG_NAMESPACE),
        marks.get(TAG_NAME),
        marks.get(TAG_UID),
    ) else {
        return Mark::NotOurs;
    };
    let id = LoadBalancerId {
        namespace: namespace.clone(),
        name: name.clone(),
        uid: uid.clone(),
    };
    match marks.get(TAG_CLUSTER_UID) {
        Some(u) if *u == cluster.uid => Mark::Ours(id),
        other => Mark::Foreign {
            id,
            cluster_uid: other.cloned(),
        },
    }
}

/// 64-bit FNV-1a: stable across releases, which names must be.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// 16 hex digits naming a Service's resources in a cloud: the same for the same cluster id
/// and Service UID, in every release.
pub fn resource_hash(cluster_id: &str, uid: &str) -> String {
    format!("{:016x}", fnv1a(format!("{cluster_id}\0{uid}").as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterIdentity {
        ClusterIdentity {
            id: "prod".into(),
            uid: "uid-of-prod".into(),
        }
    }

    fn web() -> LoadBalancerId {
        LoadBalancerId {
            namespace: "default".into(),
            name: "web".into(),
            uid: "uid-web".into(),
        }
    }

    #[test]
    fn only_both_marks_make_a_resource_ours() {
        let marks = marks(&cluster(), &web());
        assert_eq!(owner(&cluster(), &marks), Mark::Ours(web()));

        let copied_id = ClusterIdentity {
            id: "prod".into(),
            uid: "uid-of-another-cluster".into(),
        };
        assert_eq!(
            owner(&copied_id, &marks),
            Mark::Foreign {
                id: web(),
                cluster_uid: Some("uid-of-prod".into())
            }
        );

        let mut legacy = marks.clone();
        legacy.remove(TAG_CLUSTER_UID);
        assert!(matches!(
            owner(&cluster(), &legacy),
            Mark::Foreign {
                cluster_uid: None,
                ..
            }
        ));

        let other = ClusterIdentity {
            id: "staging".into(),
            uid: "uid-of-prod".into(),
        };
        assert_eq!(owner(&other, &marks), Mark::NotOurs);
        let mut no_service = marks;
        no_service.remove(TAG_UID);
        assert_eq!(owner(&cluster(), &no_service), Mark::NotOurs);
    }

    #[test]
    fn resource_names_never_change_between_releases() {
        // A changed hash would orphan every balancer ferry made before.
        assert_eq!(resource_hash("prod", "uid-web"), "aad867515cb22e55");
        assert_eq!(resource_hash("", ""), "af63bd4c8601b7df");
        assert_ne!(
            resource_hash("prod", "uid-web"),
            resource_hash("prod2", "uid-web")
        );
    }
}
