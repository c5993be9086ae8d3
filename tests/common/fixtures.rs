//! Test images pushed into a registry by third-party clients, so that tests pull exactly what
//! real tools produce: oras-py for CNCF and wasme Wasm artifacts, skopeo for OCI and Docker
//! images and indexes, and raw uploads for manifests no tool would write.
//!
//! Every push returns the manifest as the registry then serves it, read back with an `Accept`
//! header (without one, distribution 404s OCI manifests and converts schema2 to schema1).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde_json::{json, Value};
use tempfile::TempDir;

use super::http::{Endpoint, Response};
use super::token::{fetch_token, parse_bearer_challenge};
use super::wasm::{digest, sha256_hex};
use super::{isolate, require_tool, run_checked, venv_python};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config, as skopeo writes it for `--format v2s2`.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Uncompressed OCI layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Gzipped OCI layer.
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Gzipped Docker layer.
pub const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Module layer of a CNCF Wasm artifact.
pub const CNCF_LAYER: &str = "application/wasm";
/// Config of a CNCF Wasm artifact.
pub const CNCF_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// Module layer of a solo.io wasme image.
pub const WASME_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// Config of a solo.io wasme image.
pub const WASME_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
/// A wasme config as the WebAssembly Hub writes it.
pub const WASME_CONFIG_JSON: &str = r#"{"type":"envoy_proxy","abiVersions":["v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f"],"config":{"rootIds":["add_header"]}}"#;

/// The `Accept` header that makes the registry serve any manifest as stored.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// A manifest as the registry serves it after a push.
#[derive(Clone, Debug)]
pub struct PushedManifest {
    /// `sha256:<hex>` of `bytes`, which the registry also reported.
    pub digest: String,
    /// The `Content-Type` the registry served it with.
    pub media_type: String,
    /// The exact manifest bytes.
    pub bytes: Vec<u8>,
}

impl PushedManifest {
    /// The manifest parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).expect("manifest is JSON")
    }

    /// The digests of the manifest's layers (empty for an index).
    pub fn layer_digests(&self) -> Vec<String> {
        self.json()["layers"]
            .as_array()
            .map(|layers| {
                layers
                    .iter()
                    .map(|layer| layer["digest"].as_str().expect("layer digest").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Manifest format for [`skopeo_push_image`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// OCI image manifest, media types kept as given.
    Oci,
    /// Docker schema 2: skopeo rewrites the config and layer media types to Docker's.
    DockerV2S2,
}

/// One entry of a hand-built tar layer.
#[derive(Clone, Copy, Debug)]
pub enum TarEntry<'a> {
    /// A regular file; the path is written verbatim, so `../evil` or `/abs` are possible.
    File(&'a str, &'a [u8]),
    /// A directory.
    Dir(&'a str),
    /// A symbolic link `path -> target`.
    Symlink(&'a str, &'a str),
}

/// Splits `repo:tag` (the repo may contain `/` but no `:`).
pub fn split_reference(reference: &str) -> (&str, &str) {
    reference
        .rsplit_once(':')
        .filter(|(repo, tag)| !repo.is_empty() && !tag.contains('/'))
        .unwrap_or_else(|| panic!("expected repo:tag, got {reference:?}"))
}

/// Reads manifest `reference` (tag or digest) of `repo` back from the registry.
pub fn fetch_manifest(
    endpoint: impl Into<Endpoint>,
    repo: &str,
    reference: &str,
) -> PushedManifest {
    let endpoint = endpoint.into();
    let path = format!("/v2/{repo}/manifests/{reference}");
    let response = send(
        &endpoint,
        "GET",
        &path,
        &[("Accept", MANIFEST_ACCEPT)],
        None,
    );
    assert_eq!(
        response.status,
        200,
        "GET {path} from {}: {}",
        endpoint.addr,
        response.text()
    );
    let manifest_digest = digest(&response.body);
    assert_eq!(
        response.header("docker-content-digest"),
        Some(manifest_digest.as_str()),
        "registry digest of {path} differs from the served bytes"
    );
    PushedManifest {
        digest: manifest_digest,
        media_type: response.header("content-type").unwrap_or("").to_owned(),
        bytes: response.body,
    }
}

/// Pushes `module` as a CNCF Wasm artifact with oras-py (layer `module.wasm`).
pub fn oras_push_cncf(
    endpoint: impl Into<Endpoint>,
    reference: &str,
    module: &[u8],
) -> PushedManifest {
    let config = json!({
        "architecture": "wasm",
        "os": "wasip1",
        "layerDigests": [digest(module)],
    });
    oras_push(
        endpoint,
        reference,
        ("module.wasm", module, CNCF_LAYER),
        (config.to_string().as_bytes(), CNCF_CONFIG),
    )
}

/// Pushes `module` as a solo.io wasme image with oras-py; see [`WASME_CONFIG_JSON`].
pub fn oras_push_wasme(
    endpoint: impl Into<Endpoint>,
    reference: &str,
    module: &[u8],
    config_json: &str,
) -> PushedManifest {
    oras_push(
        endpoint,
        reference,
        ("module.wasm", module, WASME_LAYER),
        (config_json.as_bytes(), WASME_CONFIG),
    )
}

/// Pushes one file `(name, bytes, media type)` with a config `(bytes, media type)` via oras-py.
pub fn oras_push(
    endpoint: impl Into<Endpoint>,
    reference: &str,
    (file_name, file, file_media_type): (&str, &[u8], &str),
    (config, config_media_type): (&[u8], &str),
) -> PushedManifest {
    let endpoint = endpoint.into();
    let scratch = scratch_dir();
    fs::write(scratch.path().join(file_name), file).expect("writing oras file");
    fs::write(scratch.path().join("config.json"), config).expect("writing oras config");
    run_oras(
        &endpoint,
        scratch.path(),
        json!({
            "op": "push",
            "reference": reference,
            "files": [format!("{file_name}:{file_media_type}")],
            "config": format!("config.json:{config_media_type}"),
        }),
    );
    let (repo, tag) = split_reference(reference);
    fetch_manifest(&endpoint, repo, tag)
}

/// Pulls `reference` with oras-py into `out_dir`; returns the files it wrote.
pub fn oras_pull(endpoint: impl Into<Endpoint>, reference: &str, out_dir: &Path) -> Vec<PathBuf> {
    let scratch = scratch_dir();
    let stdout = run_oras(
        &endpoint.into(),
        scratch.path(),
        json!({"op": "pull", "reference": reference, "outdir": out_dir}),
    );
    let files: Vec<PathBuf> = serde_json::from_str(stdout.lines().last().unwrap_or("[]"))
        .unwrap_or_else(|error| panic!("oras pull printed {stdout:?}: {error}"));
    files
}

/// The oras-py driver; reads a JSON job from argv and prints pulled files as JSON.
///
/// Its auth backend answers a basic challenge like oras-py's `basic` backend and a Bearer
/// challenge with the token flow. oras-py's own `token` backend keeps one token and renews it
/// only on a 403, but distribution answers a missing scope with 401, so a pull-scoped token from
/// the first `HEAD` would fail the upload: this one asks for the job's whole scope at once.
const ORAS_SCRIPT: &str = r#"
import json, sys
import oras.auth
import oras.auth.utils as auth_utils
import oras.client

job = json.loads(sys.argv[1])
reference = job["reference"]
repo = reference.split("@")[0] if "@" in reference else reference.rsplit(":", 1)[0]
scope = "repository:%s:%s" % (repo, "pull,push" if job["op"] == "push" else "pull")

class BasicOrTokenAuth(oras.auth.TokenAuth):
    def authenticate_request(self, original, headers, refresh=False):
        headers = dict(headers or {})
        challenge = original.headers.get("Www-Authenticate") or ""
        if not challenge.lower().startswith("bearer"):
            headers["Authorization"] = "Basic %s" % getattr(self, "_basic_auth", None)
            return headers, True
        header = auth_utils.parse_auth_header(challenge)
        header.scope = scope
        self.token = self.request_token(header)
        if not self.token:
            return headers, False
        headers["Authorization"] = "Bearer %s" % self.token
        return headers, True

oras.auth.auth_backends["basic-or-token"] = BasicOrTokenAuth
options = {"hostname": job["addr"], "insecure": job["ca"] is None}
if job["ca"] is not None:
    options["tls_verify"] = job["ca"]
options["auth_backend"] = "basic-or-token"
client = oras.client.OrasClient(**options)
if job["user"] is not None:
    client.login(username=job["user"], password=job["password"], hostname=job["addr"])
target = job["addr"] + "/" + reference
if job["op"] == "push":
    client.push(target=target, files=job["files"], manifest_config=job["config"], quiet=True)
else:
    print(json.dumps(client.pull(target=target, outdir=job["outdir"])))
"#;

/// Runs [`ORAS_SCRIPT`] in `dir` with a scratch `HOME` (oras-py's login writes
/// `~/.docker/config.json`); returns stdout.
fn run_oras(endpoint: &Endpoint, dir: &Path, mut job: Value) -> String {
    job["addr"] = json!(endpoint.addr);
    job["ca"] = json!(endpoint.ca_cert);
    job["user"] = json!(endpoint.credentials.as_ref().map(|(user, _)| user));
    job["password"] = json!(endpoint.credentials.as_ref().map(|(_, password)| password));
    let mut python = Command::new(venv_python());
    isolate(&mut python, dir)
        .current_dir(dir)
        .args(["-c", ORAS_SCRIPT])
        .arg(job.to_string());
    let output = run_checked(&mut python);
    String::from_utf8(output.stdout).expect("oras output is UTF-8")
}

/// Builds a tar of regular files, gzipped when `gzip` is set.
pub fn tar_layer(files: &[(&str, &[u8])], gzip: bool) -> Vec<u8> {
    let entries: Vec<TarEntry> = files
        .iter()
        .map(|(path, bytes)| TarEntry::File(path, bytes))
        .collect();
    tar_entries(&entries, gzip)
}

/// Builds a tar of arbitrary entries (including unsafe paths), gzipped when `gzip` is set.
pub fn tar_entries(entries: &[TarEntry], gzip: bool) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        let (path, data): (&str, &[u8]) = match *entry {
            TarEntry::File(path, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                (path, data)
            }
            TarEntry::Dir(path) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                (path, &[])
            }
            TarEntry::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header
                    .set_link_name_literal(target)
                    .expect("symlink target fits the header");
                (path, &[])
            }
        };
        header.set_size(data.len() as u64);
        set_path_verbatim(&mut header, path);
        header.set_cksum();
        builder.append(&header, data).expect("appending tar entry");
    }
    let tar = builder.into_inner().expect("finishing tar");
    if gzip {
        gzip_bytes(&tar)
    } else {
        tar
    }
}

/// Writes `path` into the header's name field as is: the `tar` crate's `set_path` refuses `..`
/// and absolute paths, which negative tests need.
fn set_path_verbatim(header: &mut tar::Header, path: &str) {
    let name = &mut header.as_old_mut().name;
    assert!(
        path.len() <= name.len(),
        "tar path {path:?} is longer than 100 bytes"
    );
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
}

/// Gzips `bytes`.
pub fn gzip_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// Gunzips `bytes` if they start with the gzip magic; returns them unchanged otherwise.
fn gunzip_if_gzipped(bytes: &[u8]) -> Vec<u8> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return bytes.to_vec();
    }
    let mut plain = Vec::new();
    GzDecoder::new(bytes)
        .read_to_end(&mut plain)
        .expect("gunzip layer");
    plain
}

/// An OCI image layout under construction in a temp dir.
struct OciLayout {
    dir: TempDir,
}

impl OciLayout {
    fn new() -> OciLayout {
        let layout = OciLayout { dir: scratch_dir() };
        fs::create_dir_all(layout.dir.path().join("blobs/sha256")).expect("layout blob dir");
        fs::write(
            layout.dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("writing oci-layout");
        layout
    }

    /// Stores a blob and returns its descriptor.
    fn blob(&self, bytes: &[u8], media_type: &str) -> Value {
        let path = self.dir.path().join("blobs/sha256").join(sha256_hex(bytes));
        fs::write(path, bytes).expect("writing layout blob");
        json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
    }

    /// Stores an image (config, layers, manifest) and returns the manifest's descriptor.
    fn image(&self, os: &str, arch: &str, layers: &[Vec<u8>], layer_media_type: &str) -> Value {
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|layer| digest(&gunzip_if_gzipped(layer)))
            .collect();
        let config = json!({
            "architecture": arch,
            "os": os,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.blob(config.to_string().as_bytes(), OCI_CONFIG),
            "layers": layers
                .iter()
                .map(|layer| self.blob(layer, layer_media_type))
                .collect::<Vec<_>>(),
        });
        let mut descriptor = self.blob(manifest.to_string().as_bytes(), OCI_MANIFEST);
        descriptor["platform"] = json!({"os": os, "architecture": arch});
        descriptor
    }

    /// Writes `index.json` naming `descriptor` as `tag`.
    fn tag(&self, mut descriptor: Value, tag: &str) {
        descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]});
        fs::write(self.dir.path().join("index.json"), index.to_string()).expect("index.json");
    }

    /// Copies `oci:DIR:TAG` to `docker://ADDR/REFERENCE` with skopeo.
    fn push(&self, endpoint: &Endpoint, reference: &str, tag: &str, extra_args: &[&str]) {
        let mut skopeo = Command::new(require_tool("skopeo"));
        isolate(&mut skopeo, self.dir.path())
            .args(["--insecure-policy", "copy", "--quiet", "--retry-times", "0"])
            .args(extra_args);
        match &endpoint.ca_cert {
            Some(ca) => skopeo
                .arg("--dest-cert-dir")
                .arg(ca.parent().expect("CA dir")),
            None => skopeo.arg("--dest-tls-verify=false"),
        };
        match &endpoint.credentials {
            Some((user, password)) => skopeo.arg(format!("--dest-creds={user}:{password}")),
            None => skopeo.arg("--dest-no-creds"),
        };
        skopeo
            .arg(format!("oci:{}:{tag}", self.dir.path().display()))
            .arg(format!("docker://{}/{reference}", endpoint.addr));
        run_checked(&mut skopeo);
    }
}

/// Pushes a `linux/amd64` image of `layers` (tar or tar+gzip, as given) with skopeo.
///
/// The image config's `diff_ids` are the digests of the uncompressed layers. With
/// [`ImageFormat::Oci`] layers are pushed exactly as given. With [`ImageFormat::DockerV2S2`],
/// OCI media types become Docker ones (tar+gzip → `…rootfs.diff.tar.gzip`); give it gzip
/// layers, since skopeo gzips a plain tar layer unless the repository already holds it.
pub fn skopeo_push_image(
    endpoint: impl Into<Endpoint>,
    reference: &str,
    layers: Vec<Vec<u8>>,
    layer_media_type: &str,
    format: ImageFormat,
) -> PushedManifest {
    let endpoint = endpoint.into();
    let (repo, tag) = split_reference(reference);
    let layout = OciLayout::new();
    let mut descriptor = layout.image("linux", "amd64", &layers, layer_media_type);
    descriptor
        .as_object_mut()
        .expect("descriptor")
        .remove("platform");
    layout.tag(descriptor, tag);
    // `--preserve-digests` stops skopeo from gzipping plain tar layers, but it also silently
    // ignores `--format v2s2`, so the Docker conversion goes without it.
    let (format_args, manifest_media_type): (&[&str], _) = match format {
        ImageFormat::Oci => (&["--format", "oci", "--preserve-digests"], OCI_MANIFEST),
        ImageFormat::DockerV2S2 => (&["--format", "v2s2"], DOCKER_MANIFEST),
    };
    layout.push(&endpoint, reference, tag, format_args);
    let manifest = fetch_manifest(&endpoint, repo, tag);
    assert_eq!(
        manifest.media_type, manifest_media_type,
        "skopeo pushed {reference} in another format"
    );
    manifest
}

/// Pushes an OCI image index with one image per `(os, arch, layers)` entry using `skopeo copy
/// --all`, blobs exactly as given; a layer's media type follows its content (gzip, wasm or
/// plain tar).
pub fn skopeo_push_index(
    endpoint: impl Into<Endpoint>,
    reference: &str,
    entries: Vec<(&str, &str, Vec<Vec<u8>>)>,
) -> PushedManifest {
    let endpoint = endpoint.into();
    let (repo, tag) = split_reference(reference);
    let layout = OciLayout::new();
    let manifests: Vec<Value> = entries
        .iter()
        .map(|(os, arch, layers)| {
            let media_type = layers
                .first()
                .map_or(OCI_LAYER_TAR, |layer| layer_media_type_of(layer));
            layout.image(os, arch, layers, media_type)
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    let descriptor = layout.blob(index.to_string().as_bytes(), OCI_INDEX);
    layout.tag(descriptor, tag);
    layout.push(&endpoint, reference, tag, &["--all", "--preserve-digests"]);
    fetch_manifest(&endpoint, repo, tag)
}

/// Guesses a layer media type from its first bytes.
fn layer_media_type_of(layer: &[u8]) -> &'static str {
    if layer.starts_with(&[0x1f, 0x8b]) {
        OCI_LAYER_TAR_GZIP
    } else if layer.starts_with(b"\0asm") {
        CNCF_LAYER
    } else {
        OCI_LAYER_TAR
    }
}

/// Uploads `blob` to `repo` with the two-step upload API (POST, then PUT `?digest=`).
pub fn push_blob(endpoint: impl Into<Endpoint>, repo: &str, blob: &[u8]) -> String {
    let endpoint = endpoint.into();
    let blob_digest = digest(blob);
    let start = send(
        &endpoint,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        None,
    );
    assert_eq!(
        start.status,
        202,
        "starting upload to {repo}: {}",
        start.text()
    );
    let location = start.header("location").expect("upload location");
    // Distribution answers with an absolute URL; keep only the path and query.
    let location = match location.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/').unwrap_or(rest.len())..],
        None => location,
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    let finish = send(
        &endpoint,
        "PUT",
        &format!("{location}{separator}digest={blob_digest}"),
        &[],
        Some(blob),
    );
    assert_eq!(
        finish.status,
        201,
        "uploading {blob_digest}: {}",
        finish.text()
    );
    blob_digest
}

/// Uploads `blobs`, then puts `manifest` verbatim as `repo:reference` with `media_type`, for
/// manifests third-party tools would never write (odd media types, wrong sizes).
pub fn push_raw(
    endpoint: impl Into<Endpoint>,
    repo: &str,
    reference: &str,
    manifest: &[u8],
    media_type: &str,
    blobs: Vec<Vec<u8>>,
) -> PushedManifest {
    let endpoint = endpoint.into();
    for blob in &blobs {
        push_blob(&endpoint, repo, blob);
    }
    let path = format!("/v2/{repo}/manifests/{reference}");
    let response = send(
        &endpoint,
        "PUT",
        &path,
        &[("Content-Type", media_type)],
        Some(manifest),
    );
    assert_eq!(response.status, 201, "PUT {path}: {}", response.text());
    let pushed = PushedManifest {
        digest: digest(manifest),
        media_type: media_type.to_owned(),
        bytes: manifest.to_vec(),
    };
    assert_eq!(
        response.header("docker-content-digest"),
        Some(pushed.digest.as_str()),
        "registry stored {path} under another digest"
    );
    pushed
}

/// Sends one request like [`Endpoint::request`], following the Docker token flow: when a token
/// registry answers 401 with a `Bearer` challenge, a token for the challenged scope is fetched
/// from the announced realm with the endpoint's credentials (if any), and the request is sent
/// once more with `Authorization: Bearer` instead of basic auth. Other answers are returned as
/// they are.
fn send(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let response = endpoint.request(method, path, headers, body);
    let challenge = response
        .header("www-authenticate")
        .filter(|_| response.status == 401)
        .and_then(parse_bearer_challenge);
    let Some(challenge) = challenge else {
        return response;
    };
    let credentials = endpoint
        .credentials
        .as_ref()
        .map(|(user, password)| (user.as_str(), password.as_str()));
    let bearer = format!("Bearer {}", fetch_token(&challenge, credentials));
    let mut with_token = headers.to_vec();
    with_token.push(("Authorization", &bearer));
    let without_basic = Endpoint {
        credentials: None,
        ..endpoint.clone()
    };
    without_basic.request(method, path, &with_token, body)
}

/// A temp dir for one tool invocation.
fn scratch_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("fixture-")
        .tempdir()
        .expect("fixture temp dir")
}
