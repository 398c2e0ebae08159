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

/// `kubectl kustomize` of an overlay of the user's own: `deploy/<overlay>`
/// with `deploy/<component>` of each of `components`, as their README
/// shows. Its text and its objects.
pub fn render_with(overlay: &str, components: &[&str]) -> (String, Vec<Value>) {
    let own = tempfile::tempdir().expect("a temporary directory");
    // kustomize takes only relative paths to other kustomizations.
    let up = "../".repeat(own.path().components().count() - 1);
    let deploy = dir().canonicalize().expect("deploy/ exists");
    let from_root = deploy.strip_prefix("/").expect("an absolute path");
    let at = |path: &str| format!("{up}{}", from_root.join(path).display());
    let components: Vec<String> = components.iter().map(|c| at(c)).collect();
    std::fs::write(
        own.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [{}]\ncomponents: [{}]\n",
            at(overlay),
            components.join(", ")
        ),
    )
    .expect("writing the kustomization");
    render(own.path().to_str().expect("a UTF-8 path"))
}

/// The object of `kind` named `name` among `objects`.
pub fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {objects:#?}"))
}
