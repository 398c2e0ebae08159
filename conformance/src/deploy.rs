//! `deploy/` as a cluster gets it: rendered with the `kubectl kustomize`
//! users have.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

/// The repository's `deploy/`.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `kubectl kustomize deploy/<kustomization>`: its text and its objects.
pub fn render(kustomization: &str) -> (String, Vec<Value>) {
    let path = dir().join(kustomization);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("running kubectl (on the image; README's set-up checks it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 from kubectl");
    let objects = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("the rendered {kustomization}: {e}"));
    (text, objects)
}

/// The object of `kind` named `name` among `objects`.
pub fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {objects:#?}"))
}
