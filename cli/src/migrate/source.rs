//! Where `ferry migrate` reads MetalLB's configuration: YAML files (multi-document, `-` for
//! stdin) or the live cluster (MetalLB's resources in its namespace, its legacy ConfigMap,
//! and every Service for the annotations). Everything becomes plain YAML values.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde::Deserialize;

/// Every document of every file, in order; `-` is stdin.
pub fn from_files(files: &[PathBuf]) -> anyhow::Result<Vec<serde_yaml::Value>> {
    let mut docs = Vec::new();
    for file in files {
        let text = if file.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            s
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        docs.extend(documents(&text).with_context(|| format!("parsing {}", file.display()))?);
    }
    Ok(docs)
}

/// The non-empty documents of a multi-document YAML text.
pub fn documents(text: &str) -> Result<Vec<serde_yaml::Value>, serde_yaml::Error> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

fn to_yaml<T: serde::Serialize>(v: &T) -> anyhow::Result<serde_yaml::Value> {
    serde_yaml::to_value(v).context("converting an object to YAML")
}

/// MetalLB's resources from the cluster; kinds whose CRD is absent are skipped.
pub async fn from_cluster(namespace: &str) -> anyhow::Result<Vec<serde_yaml::Value>> {
    let client = ferry_runtime::kube_client().await?;
    let mut docs = Vec::new();
    let kinds = [
        ("v1beta1", "IPAddressPool", "ipaddresspools"),
        ("v1beta1", "L2Advertisement", "l2advertisements"),
        ("v1beta1", "BGPAdvertisement", "bgpadvertisements"),
        ("v1beta2", "BGPPeer", "bgppeers"),
        ("v1beta1", "Community", "communities"),
    ];
    for (version, kind, plural) in kinds {
        let gvk = GroupVersionKind::gvk("metallb.io", version, kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                for mut obj in list.items {
                    obj.types = Some(kube::core::TypeMeta {
                        api_version: ar.api_version.clone(),
                        kind: kind.to_string(),
                    });
                    docs.push(to_yaml(&obj)?);
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("listing MetalLB {kind}s")),
        }
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    if let Some(mut cm) = config_maps
        .get_opt("config")
        .await
        .context("reading MetalLB's legacy ConfigMap")?
    {
        cm.metadata.managed_fields = None;
        let mut v = to_yaml(&cm)?;
        if let Some(m) = v.as_mapping_mut() {
            m.insert("kind".into(), "ConfigMap".into());
            m.insert("apiVersion".into(), "v1".into());
        }
        docs.push(v);
    }
    let services: Api<Service> = Api::all(client);
    for svc in services
        .list(&ListParams::default())
        .await
        .context("listing Services")?
        .items
    {
        let mut v = to_yaml(&svc)?;
        if let Some(m) = v.as_mapping_mut() {
            m.insert("kind".into(), "Service".into());
            m.insert("apiVersion".into(), "v1".into());
        }
        docs.push(v);
    }
    Ok(docs)
}
