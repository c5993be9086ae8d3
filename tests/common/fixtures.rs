//! Test images pushed by third-party clients, so that tests pull what real tools produce:
//! oras-py for Wasm artifacts, skopeo for images and indexes, raw uploads for manifests no tool
//! would write. Every push returns the manifest as the registry serves it (with an `Accept`:
//! without one, distribution 404s OCI manifests and converts schema2 to schema1).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde_json::{json, Value};
use tempfile::TempDir;

use super::http::{Endpoint, Response};
use super::wasm::{digest, sha256_hex};
use super::{isolate, require_tool, run_checked, venv_python};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Module layer and config of a CNCF Wasm artifact.
pub const CNCF_LAYER: &str = "application/wasm";
pub const CNCF_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// Module layer and config of a solo.io wasme image.
pub const WASME_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const WASME_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";

/// The `Accept` header that makes the registry serve any manifest as stored.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// A manifest as the registry serves it after a push: the exact bytes, their digest (which the
/// registry also reported) and the `Content-Type` they were served with.
#[derive(Clone, Debug)]
pub struct PushedManifest {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl PushedManifest {
    /// The manifest parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).expect("manifest is JSON")
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

/// One entry of a hand-built tar layer: a regular file, a directory or a symbolic link
/// `path -> target`. Paths are written verbatim, so `../evil` or `/abs` are possible.
#[derive(Clone, Copy, Debug)]
pub enum TarEntry<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
}

/// Reads manifest `reference` (tag or digest) of `repo` back from the registry.
pub fn fetch_manifest(
    endpoint: impl Into<Endpoint>,
    repo: &str,
    reference: &str,
) -> PushedManifest {
    let (endpoint, path) = (endpoint.into(), format!("/v2/{repo}/manifests/{reference}"));
    let response = endpoint.get(&path, &[("Accept", MANIFEST_ACCEPT)]);
    assert_eq!(
        response.status,
        200,
        "GET {path} from {}: {}",
        endpoint.addr,
        response.text()
    );
    let header = |name| response.header(name).unwrap_or("").to_owned();
    checked_manifest(
        &path,
        header("docker-content-digest"),
        header("content-type"),
        response.body,
    )
}

/// The manifest served as `bytes`, after checking the registry reported their digest.
fn checked_manifest(
    name: &str,
    reported: String,
    media_type: String,
    bytes: Vec<u8>,
) -> PushedManifest {
    let digest = digest(&bytes);
    assert_eq!(
        reported, digest,
        "registry digest of {name} differs from the served bytes"
    );
    PushedManifest {
        digest,
        media_type,
        bytes,
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

/// Pushes `module` as a solo.io wasme image with oras-py.
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
    let answer = run_oras(
        &endpoint,
        scratch.path(),
        json!({
            "op": "push",
            "reference": reference,
            "files": [format!("{file_name}:{file_media_type}")],
            "config": format!("config.json:{config_media_type}"),
            "accept": MANIFEST_ACCEPT,
        }),
    );
    assert_eq!(answer["status"], 200, "reading back {reference}: {answer}");
    let text = |name: &str| answer[name].as_str().unwrap_or("").to_owned();
    let bytes = STANDARD.decode(text("bytes")).expect("base64 manifest");
    checked_manifest(reference, text("digest"), text("type"), bytes)
}

/// Pulls `reference` with oras-py into `out_dir`; returns the files it wrote.
pub fn oras_pull(endpoint: impl Into<Endpoint>, reference: &str, out_dir: &Path) -> Vec<PathBuf> {
    let scratch = scratch_dir();
    let job = json!({"op": "pull", "reference": reference, "outdir": out_dir});
    let files = run_oras(&endpoint.into(), scratch.path(), job);
    serde_json::from_value(files).expect("oras pull prints the files it wrote")
}

/// The oras-py driver: runs the JSON job in argv, prints the pushed manifest as the registry
/// serves it (read through oras-py's session, whatever the auth) or the pulled files, as JSON.
/// Its auth backend asks for the job's whole scope at once: oras-py's `token` backend renews
/// a token only on a 403, and distribution answers a missing scope with 401.
const ORAS_SCRIPT: &str = r#"
import base64, json, sys
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
client = oras.client.OrasClient(hostname=job["addr"], insecure=True, auth_backend="basic-or-token")
if job["user"] is not None:
    client.login(username=job["user"], password=job["password"], hostname=job["addr"])
target = job["addr"] + "/" + reference
if job["op"] == "push":
    client.push(target=target, files=job["files"], manifest_config=job["config"], quiet=True)
    url = "http://%s/v2/%s/manifests/%s" % (job["addr"], repo, reference.rsplit(":", 1)[1])
    answer = client.do_request(url, "GET", headers={"Accept": job["accept"]})
    print(json.dumps({"status": answer.status_code, "digest": answer.headers.get("Docker-Content-Digest"),
        "type": answer.headers.get("Content-Type"), "bytes": base64.b64encode(answer.content).decode()}))
else:
    print(json.dumps(client.pull(target=target, outdir=job["outdir"])))
"#;

/// Runs [`ORAS_SCRIPT`] in `dir` with a scratch `HOME` (oras-py's login writes
/// `~/.docker/config.json`); returns what it printed last, as JSON.
fn run_oras(endpoint: &Endpoint, dir: &Path, mut job: Value) -> Value {
    job["addr"] = json!(endpoint.addr);
    job["user"] = json!(endpoint.credentials.as_ref().map(|(user, _)| user));
    job["password"] = json!(endpoint.credentials.as_ref().map(|(_, password)| password));
    let mut python = Command::new(venv_python());
    isolate(&mut python, dir)
        .current_dir(dir)
        .args(["-c", ORAS_SCRIPT])
        .arg(job.to_string());
    let stdout = String::from_utf8(run_checked(&mut python).stdout).expect("UTF-8 output");
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|error| panic!("oras-py printed {stdout:?}: {error}"))
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
    use tar::EntryType::{Directory, Regular, Symlink};
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let (kind, mode, path, data, link) = match *entry {
            TarEntry::File(path, data) => (Regular, 0o644, path, data, None),
            TarEntry::Dir(path) => (Directory, 0o755, path, &[][..], None),
            TarEntry::Symlink(path, target) => (Symlink, 0o777, path, &[][..], Some(target)),
        };
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        if let Some(target) = link {
            header
                .set_link_name_literal(target)
                .expect("symlink target fits the header");
        }
        // As is: the `tar` crate's `set_path` refuses `..` and absolute paths, which negative
        // tests need. Owner and mtime stay 0.
        let name = &mut header.as_old_mut().name;
        assert!(
            path.len() <= name.len(),
            "tar path {path:?} is longer than 100 bytes"
        );
        name[..path.len()].copy_from_slice(path.as_bytes());
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

/// An OCI image layout under construction in a temp dir, pushed with `skopeo copy`.
struct OciLayout(TempDir);

impl OciLayout {
    fn new() -> OciLayout {
        let layout = OciLayout(scratch_dir());
        fs::create_dir_all(layout.0.path().join("blobs/sha256")).expect("layout blob dir");
        let version = r#"{"imageLayoutVersion":"1.0.0"}"#;
        fs::write(layout.0.path().join("oci-layout"), version).expect("oci-layout");
        layout
    }

    /// Stores a blob and returns its descriptor.
    fn blob(&self, bytes: &[u8], media_type: &str) -> Value {
        let path = self.0.path().join("blobs/sha256").join(sha256_hex(bytes));
        fs::write(path, bytes).expect("writing a layout blob");
        json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
    }

    /// Stores an image (a config naming the uncompressed layers' digests, the layers, the
    /// manifest) and returns the manifest's descriptor.
    fn image(&self, layers: &[Vec<u8>], media_type: &str, os: &str, arch: &str) -> Value {
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|l| digest(&gunzip_if_gzipped(l)))
            .collect();
        let rootfs = json!({"type": "layers", "diff_ids": diff_ids});
        let config = json!({"architecture": arch, "os": os, "rootfs": rootfs}).to_string();
        let config = self.blob(config.as_bytes(), OCI_CONFIG);
        let layers: Vec<Value> = layers.iter().map(|l| self.blob(l, media_type)).collect();
        let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers});
        self.blob(manifest.to_string().as_bytes(), OCI_MANIFEST)
    }

    /// Tags `descriptor` in `index.json`, copies the layout to `reference` with skopeo and
    /// reads the manifest back.
    fn push(
        &self,
        endpoint: Endpoint,
        reference: &str,
        mut descriptor: Value,
        args: &[&str],
    ) -> PushedManifest {
        let (repo, tag) = reference.rsplit_once(':').expect("repo:tag");
        descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]});
        fs::write(self.0.path().join("index.json"), index.to_string()).expect("index.json");
        let mut skopeo = Command::new(require_tool("skopeo"));
        isolate(&mut skopeo, self.0.path()).args(["--insecure-policy", "copy", "--quiet"]);
        skopeo
            .args(["--retry-times", "0", "--dest-tls-verify=false"])
            .args(args);
        match &endpoint.credentials {
            Some((user, password)) => skopeo.arg(format!("--dest-creds={user}:{password}")),
            None => skopeo.arg("--dest-no-creds"),
        };
        skopeo.arg(format!("oci:{}:{tag}", self.0.path().display()));
        run_checked(skopeo.arg(format!("docker://{}/{reference}", endpoint.addr)));
        fetch_manifest(&endpoint, repo, tag)
    }
}

/// Pushes a `linux/amd64` image of `layers` (tar or tar+gzip) with skopeo: as given with
/// [`ImageFormat::Oci`]; with [`ImageFormat::DockerV2S2`] the media types become Docker's
/// (give it gzip layers: skopeo gzips a plain tar layer unless the repository holds it).
pub fn skopeo_push_image(
    endpoint: impl Into<Endpoint>,
    reference: &str,
    layers: Vec<Vec<u8>>,
    layer_media_type: &str,
    format: ImageFormat,
) -> PushedManifest {
    let layout = OciLayout::new();
    let descriptor = layout.image(&layers, layer_media_type, "linux", "amd64");
    // `--preserve-digests` stops skopeo from gzipping plain tar layers, but it also silently
    // ignores `--format v2s2`, so the Docker conversion goes without it.
    let (args, media_type): (&[&str], _) = match format {
        ImageFormat::Oci => (&["--format", "oci", "--preserve-digests"], OCI_MANIFEST),
        ImageFormat::DockerV2S2 => (&["--format", "v2s2"], DOCKER_MANIFEST),
    };
    let manifest = layout.push(endpoint.into(), reference, descriptor, args);
    assert_eq!(
        manifest.media_type, media_type,
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
    let layout = OciLayout::new();
    let manifests: Vec<Value> = (entries.iter())
        .map(|(os, arch, layers)| {
            let media_type = match layers.first().map_or(&[][..], |layer| &layer[..]) {
                [0x1f, 0x8b, ..] => OCI_LAYER_TAR_GZIP,
                [0, b'a', b's', b'm', ..] => CNCF_LAYER,
                _ => OCI_LAYER_TAR,
            };
            let mut descriptor = layout.image(layers, media_type, os, arch);
            descriptor["platform"] = json!({"os": os, "architecture": arch});
            descriptor
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    let descriptor = layout.blob(index.to_string().as_bytes(), OCI_INDEX);
    layout.push(
        endpoint.into(),
        reference,
        descriptor,
        &["--all", "--preserve-digests"],
    )
}

/// Uploads `blobs`, then puts `manifest` verbatim as `repo:reference` with `media_type`, for
/// manifests third-party tools would never write (odd media types, wrong sizes). Blobs go up
/// with the two-step upload API (POST, then PUT `?digest=`).
pub fn push_raw(
    endpoint: impl Into<Endpoint>,
    repo: &str,
    reference: &str,
    manifest: &[u8],
    media_type: &str,
    blobs: Vec<Vec<u8>>,
) -> PushedManifest {
    let endpoint = endpoint.into();
    let put = |path: &str, headers: &[(&str, &str)], body: &[u8]| {
        let response = endpoint.request("PUT", path, headers, Some(body));
        assert_eq!(response.status, 201, "PUT {path}: {}", response.text());
        response
            .header("docker-content-digest")
            .unwrap_or("")
            .to_owned()
    };
    for blob in &blobs {
        let start = endpoint.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], None);
        assert_eq!(
            start.status,
            202,
            "starting upload to {repo}: {}",
            start.text()
        );
        // Distribution answers with an absolute URL; keep only the path and query.
        let location = start.header("location").expect("upload location");
        let location = location.split_once("://").map_or(location, |(_, rest)| {
            &rest[rest.find('/').unwrap_or(rest.len())..]
        });
        let separator = if location.contains('?') { '&' } else { '?' };
        put(
            &format!("{location}{separator}digest={}", digest(blob)),
            &[],
            blob,
        );
    }
    let path = format!("/v2/{repo}/manifests/{reference}");
    let reported = put(&path, &[("Content-Type", media_type)], manifest);
    checked_manifest(&path, reported, media_type.to_owned(), manifest.to_vec())
}

/// A temp dir for one tool invocation.
fn scratch_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("fixture-")
        .tempdir()
        .expect("fixture temp dir")
}
