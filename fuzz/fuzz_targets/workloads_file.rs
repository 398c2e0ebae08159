//! The workloads file parser: any text is either a node state that keeps
//! the file's rules or an error naming a field, and a line within the
//! file when it names one; never a panic. An accepted file's addresses
//! survive the map-key encoding the kernel programs use. Read entry by
//! entry ([`file::Loader`]), a file gives what the whole parse gives.

#![no_main]

use std::collections::HashSet;

use ambridge::{
    host::cgroup::is_pod_uid,
    node::entries::{ip_from_key, ip_key},
    node::spec::{CgroupRef, NodeSpec, PodCgroup},
    sources::file,
};
use libfuzzer_sys::fuzz_target;

/// A good file in the shape the loader cuts into entries.
const SEED: &str = "workloads:
  - uid: a
    name: a
    namespace: default
    cgroup: /cg/a
    ips: [198.18.0.2]
    mode: ambient
  - uid: b
    name: b
    namespace: default
    cgroup: /cg/b
    mode: none
ztunnel:
  cgroup: /cg/z
";

/// The rules `parse` promises of a file it accepts.
fn check_accepted(spec: &NodeSpec) {
    let mut uids = HashSet::new();
    let mut cgroups = HashSet::new();
    for pod in &spec.pods {
        assert!(!pod.uid.as_str().is_empty(), "an empty uid was accepted");
        assert!(uids.insert(&pod.uid), "uid {} accepted twice", pod.uid);
        match &pod.cgroup {
            PodCgroup::Path(path) => {
                assert!(path.is_absolute(), "relative cgroup {path:?} accepted");
                assert!(cgroups.insert(&**path), "cgroup {path:?} accepted twice");
            }
            PodCgroup::Uid => assert!(
                is_pod_uid(pod.uid.as_str()),
                "{} accepted as a path part, yet not a pod UID",
                pod.uid
            ),
            PodCgroup::Address => panic!("the file never names pods by address"),
        }
        let v4 = pod.ips.iter().filter(|ip| ip.is_ipv4()).count();
        let v6 = pod.ips.iter().filter(|ip| ip.is_ipv6()).count();
        assert!(v4 <= 1 && v6 <= 1, "pod {}: {:?}", pod.uid, pod.ips);
        for ip in &pod.ips {
            assert_eq!(
                ip_from_key(&ip_key(*ip)),
                *ip,
                "pod {}'s address as a map key",
                pod.uid
            );
        }
    }
    for z in &spec.ztunnels {
        let CgroupRef::Path(path) = &z.cgroup else {
            panic!("the file names ztunnel by path only");
        };
        assert!(
            path.is_absolute(),
            "relative ztunnel cgroup {path:?} accepted"
        );
        assert!(
            !cgroups.contains(path.as_path()),
            "ztunnel shares pod cgroup {path:?}"
        );
    }
    if let Some(redirect) = spec.redirect {
        assert!(
            redirect.ip4.is_some() || redirect.ip6.is_some(),
            "a redirect without an address"
        );
        assert_ne!(redirect.port.map(|p| p.0), Some(0), "a redirect to port 0");
        if let Some(ip6) = redirect.ip6 {
            assert!(
                ip6.to_ipv4_mapped().is_none(),
                "an IPv4-mapped redirect target {ip6}"
            );
        }
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let whole = file::parse(text);
    // Read entry by entry, after a good file and then again with its
    // entries known, the file is what the whole parse says.
    let mut loader = file::Loader::default();
    loader.parse(SEED).expect("the seed file is good");
    for round in ["after another file", "again"] {
        match (loader.parse(text), &whole) {
            (Ok(_), Ok(spec)) => {
                let view = loader.view().expect("a good state");
                let mut pods = spec.pods.clone();
                pods.sort_by(|a, b| a.uid.cmp(&b.uid));
                assert_eq!(
                    view.pods
                        .values()
                        .map(|p| (**p).clone())
                        .collect::<Vec<_>>(),
                    pods,
                    "entry by entry, {round}"
                );
                assert_eq!(view.node.ztunnels, spec.ztunnels, "entry by entry, {round}");
                assert_eq!(view.node.redirect, spec.redirect, "entry by entry, {round}");
            }
            (Err(e), Err(want)) => assert_eq!(&e, want, "entry by entry, {round}"),
            (got, want) => panic!("entry by entry, {round}: {got:?}, whole: {want:?}"),
        }
    }
    match whole {
        Ok(spec) => check_accepted(&spec),
        Err(err) => {
            let shown = err.to_string();
            assert!(!err.field.is_empty(), "an error naming no field: {shown}");
            assert!(!err.message.is_empty(), "an error saying nothing: {shown}");
            if let Some(line) = err.line() {
                let lines = text.lines().count();
                assert!(
                    (1..=lines).contains(&line),
                    "{shown:?} names line {line} of a {lines}-line file"
                );
            }
        }
    }
});
