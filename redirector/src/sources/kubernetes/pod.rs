//! The pod as the feed reads it: metadata and the few fields of `spec` and
//! `status` that Istio's rules and the datapath use, nothing else. The
//! watcher decodes each page of a list (500 pods) into these at once; a
//! `k8s_openapi` Pod takes about 2 KiB before its first value (its spec
//! and status types hold every field of the API). Between events the feed
//! keeps only a [`super::KeptPod`] of each.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A core/v1 Pod, as far as the feed reads it. Like k8s-openapi's, it
/// takes a missing or null field for its default: in kube's watcher one
/// object that does not decode fails its whole list.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    pub spec: Option<Spec>,
    pub status: Option<Status>,
}

/// What the feed reads of a pod's spec.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
}

/// What the feed reads of a pod's status.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Status {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
    #[serde(rename = "containerStatuses")]
    pub container_statuses: Option<Vec<ContainerStatus>>,
    /// Where a native sidecar (an init container that keeps running, as
    /// Istio injects its proxy on Kubernetes 1.29 and later) reports.
    #[serde(rename = "initContainerStatuses")]
    pub init_container_statuses: Option<Vec<ContainerStatus>>,
}

/// What the feed reads of a container's status: its name and the
/// runtime's ID for it (`containerd://<id>`), once it is created.
#[derive(Clone, Debug, Deserialize)]
pub struct ContainerStatus {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(rename = "containerID")]
    pub container_id: Option<String>,
}

/// One of a pod's addresses.
#[derive(Clone, Debug, Deserialize)]
pub struct PodIp {
    #[serde(default, deserialize_with = "null_as_default")]
    pub ip: String,
}

/// A field's value, or its default where it is null.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl k8s_openapi::Resource for Pod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Pod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_what_the_feed_uses_of_a_full_pod_object() {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "ns", "uid": "u1",
                         "labels": {"app": "a"}, "annotations": {"k": "v"}},
            "spec": {"nodeName": "n1", "hostNetwork": true, "serviceAccountName": "sa",
                     "containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        assert_eq!(pod.metadata.uid.as_deref(), Some("u1"));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.service_account_name.as_deref(), Some("sa"));
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        let ips: Vec<String> = status.pod_ips.unwrap().into_iter().map(|p| p.ip).collect();
        assert_eq!(ips, ["10.0.0.1", "fd00::1"]);
    }

    #[test]
    fn takes_what_k8s_openapi_takes_for_missing_or_null_fields() {
        for value in [
            json!({"metadata": null, "spec": null, "status": null}),
            json!({"status": {"podIPs": [{}, {"ip": null}, {"ip": "10.0.0.2"}]}}),
            json!({}),
        ] {
            let full: Result<k8s_openapi::api::core::v1::Pod, _> =
                serde_json::from_value(value.clone());
            let lean: Result<Pod, _> = serde_json::from_value(value.clone());
            assert!(full.is_ok(), "{value}");
            assert!(lean.is_ok(), "{value}: {lean:?}");
        }
    }

    #[test]
    fn is_a_fraction_of_a_k8s_openapi_pod() {
        let lean = std::mem::size_of::<Pod>();
        let full = std::mem::size_of::<k8s_openapi::api::core::v1::Pod>();
        assert!(lean * 2 < full, "{lean} bytes against {full}");
    }
}
