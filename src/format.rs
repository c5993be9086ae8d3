//! Packagings of a Wasm module in a registry, recognised from the manifest alone.
//!
//! Four packagings are in use in the field (see `shared/README.md`): the CNCF Wasm artifact,
//! solo.io's wasme image, and OCI or Docker images with `plugin.wasm` in a tar layer. Image
//! indexes and Docker manifest lists are resolved to one platform first. This module is pure:
//! it parses documents and decides what to download; `fetch` does the downloading.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Every manifest media type we can read, in the order sent in `Accept`.
pub const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// CNCF Wasm artifact config (TAG Runtime wasm-oci spec).
pub const CNCF_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// CNCF Wasm artifact module layer.
pub const CNCF_LAYER: &str = "application/wasm";
/// solo.io wasme config.
pub const WASME_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
/// solo.io wasme module layer.
pub const WASME_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

/// Uncompressed tar layer media types.
const TAR_LAYERS: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
];
/// Gzip-compressed tar layer media types.
const TAR_GZIP_LAYERS: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

/// How a module was packaged in its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// CNCF Wasm artifact: the module is the `application/wasm` layer.
    CncfWasm,
    /// solo.io wasme image: the module is the wasme content layer.
    Wasme,
    /// OCI image with `plugin.wasm` in a tar layer.
    OciImage,
    /// Docker schema 2 image with `plugin.wasm` in a tar layer.
    DockerImage,
    /// A module served over HTTP(S): the body is the module, a gzip of it, or a tar (or
    /// tar+gzip) holding one `.wasm` file.
    Http,
}

impl Format {
    /// The name used in JSON output and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::CncfWasm => "cncf-wasm",
            Format::Wasme => "wasme",
            Format::OciImage => "oci-image",
            Format::DockerImage => "docker-image",
            Format::Http => "http",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a layer's bytes hold the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerEncoding {
    /// The layer is the module itself.
    Raw,
    /// A tar archive holding `plugin.wasm`.
    Tar,
    /// A gzip-compressed tar archive holding `plugin.wasm`.
    TarGzip,
    /// Told by its first bytes (an HTTP source's body): the module, a gzip of it, a tar or
    /// a tar+gzip holding one `.wasm` file.
    Sniffed,
}

/// A content descriptor as it appears in manifests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the referenced content (kept as text: it may use another algorithm).
    pub digest: String,
    /// Size in bytes of the referenced content.
    pub size: u64,
    /// The platform, on image index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An image index entry's platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `wasm`).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`, `wasip1`).
    #[serde(default)]
    pub os: String,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)
    }
}

/// The fields of an image manifest or image index that matter here.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// What a manifest tells us to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An index: fetch the manifest of the chosen platform.
    Index {
        /// The chosen entry.
        chosen: Descriptor,
    },
    /// An image manifest: download `layer` and get the module out of it.
    Image(ModulePlan),
}

/// Where a module is inside an image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulePlan {
    /// The packaging.
    pub format: Format,
    /// The manifest's media type (OCI image manifest when the document names none).
    pub media_type: String,
    /// The config descriptor (its bytes hold metadata for some packagings).
    pub config: Option<Descriptor>,
    /// Candidate layers holding the module, most likely first.
    pub layers: Vec<(Descriptor, LayerEncoding)>,
}

/// Why a manifest cannot yield a module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The document is not JSON of the expected shape.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// No packaging we know matches the media types.
    #[error("unsupported media type: manifest {manifest}, config {config}, layers [{layers}]")]
    Unsupported {
        /// The manifest's media type.
        manifest: String,
        /// The config's media type.
        config: String,
        /// The layers' media types, comma separated.
        layers: String,
    },
    /// An index has no entry for a platform that can carry Wasm.
    #[error("no wasm platform in image index; platforms present: [{platforms}]")]
    NoPlatform {
        /// The platforms listed, comma separated.
        platforms: String,
    },
    /// More layers (or index entries) than `limits.max_layers`.
    #[error("{kind} has {count} entries, over the limit of {limit}")]
    TooManyEntries {
        /// `manifest` or `image index`.
        kind: &'static str,
        /// How many it has.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// More than one layer claims to be the module.
    #[error("ambiguous artifact: {count} layers of media type {media_type}")]
    Ambiguous {
        /// How many layers matched.
        count: usize,
        /// Their media type.
        media_type: &'static str,
    },
}

/// What is wrong with a document that is not JSON of the expected shape, without the
/// document's own text: serde names the value it met (`invalid type: string "…"`), and a
/// manifest is whatever the upstream chose to send, so quoted values are elided.
fn json_error(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match (text.find('"'), text.rfind('"')) {
        (Some(first), Some(last)) if first < last => {
            format!("{}\"…\"{}", &text[..first], &text[last + 1..])
        }
        _ => text,
    }
}

/// Reads a manifest or index and decides what to download. `host_architecture` is the OCI
/// name of this machine's CPU (`amd64`, `arm64`), used as a fallback platform.
pub fn parse(bytes: &[u8], host_architecture: &str, max_entries: usize) -> Result<Parsed, Error> {
    let document: Document =
        serde_json::from_slice(bytes).map_err(|error| Error::Malformed(json_error(&error)))?;
    let (kind, count) = match &document.manifests {
        Some(entries) => ("image index", entries.len()),
        None => ("manifest", document.layers.len()),
    };
    if count > max_entries {
        return Err(Error::TooManyEntries {
            kind,
            count,
            limit: max_entries,
        });
    }
    if document.schema_version != Some(2) {
        return Err(Error::Malformed(format!(
            "schemaVersion is {:?}, expected 2",
            document.schema_version
        )));
    }
    let media_type = document.media_type.clone().unwrap_or_default();
    let is_index = matches!(media_type.as_str(), OCI_INDEX | DOCKER_MANIFEST_LIST)
        || (media_type.is_empty() && document.manifests.is_some());
    if is_index {
        let entries = document.manifests.unwrap_or_default();
        return choose_platform(&entries, host_architecture)
            .map(|chosen| Parsed::Index { chosen })
            .ok_or_else(|| Error::NoPlatform {
                platforms: entries
                    .iter()
                    .map(|e| {
                        e.platform
                            .as_ref()
                            .map_or("unknown".into(), |p| p.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            });
    }
    plan_image(document, media_type).map(Parsed::Image)
}

/// Picks `wasip1/wasm` (or any `wasm` architecture), then `linux/<host>`; as the CNCF spec
/// and Istio's agent respectively expect.
fn choose_platform(entries: &[Descriptor], host_architecture: &str) -> Option<Descriptor> {
    let platform_of = |e: &&Descriptor| e.platform.clone();
    let wasm = entries
        .iter()
        .find(|e| platform_of(e).is_some_and(|p| p.os == "wasip1" && p.architecture == "wasm"))
        .or_else(|| {
            entries
                .iter()
                .find(|e| platform_of(e).is_some_and(|p| p.architecture == "wasm"))
        });
    let host = || {
        entries.iter().find(|e| {
            platform_of(e).is_some_and(|p| p.os == "linux" && p.architecture == host_architecture)
        })
    };
    wasm.or_else(host).cloned()
}

fn plan_image(document: Document, media_type: String) -> Result<ModulePlan, Error> {
    let config_type = document
        .config
        .as_ref()
        .map(|c| c.media_type.clone())
        .unwrap_or_default();
    let layers_of = |wanted: &str| -> Vec<Descriptor> {
        document
            .layers
            .iter()
            .filter(|l| l.media_type == wanted)
            .cloned()
            .collect()
    };
    let single = |wanted: &'static str| -> Result<Option<Descriptor>, Error> {
        let mut found = layers_of(wanted);
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            count => Err(Error::Ambiguous {
                count,
                media_type: wanted,
            }),
        }
    };

    // The CNCF artifact: an `application/wasm` layer, with the wasm config or artifactType.
    let cncf_marked = config_type == CNCF_CONFIG
        || document.artifact_type.as_deref() == Some(CNCF_CONFIG)
        || document.artifact_type.as_deref() == Some(CNCF_LAYER);
    if let Some(layer) = single(CNCF_LAYER)? {
        let _ = cncf_marked;
        return Ok(ModulePlan {
            media_type: media_type_or_oci(&media_type),
            format: Format::CncfWasm,
            config: document.config,
            layers: vec![(layer, LayerEncoding::Raw)],
        });
    }
    // wasme: Istio requires exactly two layers; other gateways broke on single-layer images.
    // We accept any layer count and take the one wasme content layer.
    if let Some(layer) = single(WASME_LAYER)? {
        return Ok(ModulePlan {
            media_type: media_type_or_oci(&media_type),
            format: Format::Wasme,
            config: document.config,
            layers: vec![(layer, LayerEncoding::Raw)],
        });
    }
    let format = match media_type.as_str() {
        DOCKER_MANIFEST => Some(Format::DockerImage),
        OCI_MANIFEST => Some(Format::OciImage),
        "" if !cncf_marked && config_type != WASME_CONFIG => Some(Format::OciImage),
        _ => None,
    };
    // Istio's agent looks only at the last layer; we try every tar layer, last first.
    let layers: Vec<(Descriptor, LayerEncoding)> = document
        .layers
        .iter()
        .rev()
        .filter_map(|l| {
            let encoding = if TAR_GZIP_LAYERS.contains(&l.media_type.as_str()) {
                LayerEncoding::TarGzip
            } else if TAR_LAYERS.contains(&l.media_type.as_str()) {
                LayerEncoding::Tar
            } else {
                return None;
            };
            Some((l.clone(), encoding))
        })
        .collect();
    match format {
        Some(format) if !layers.is_empty() => Ok(ModulePlan {
            media_type: media_type_or_oci(&media_type),
            format,
            config: document.config,
            layers,
        }),
        _ => Err(Error::Unsupported {
            manifest: if media_type.is_empty() {
                "(none)".into()
            } else {
                media_type
            },
            config: if config_type.is_empty() {
                "(none)".into()
            } else {
                config_type
            },
            layers: document
                .layers
                .iter()
                .map(|l| l.media_type.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

fn media_type_or_oci(media_type: &str) -> String {
    match media_type {
        "" => OCI_MANIFEST.to_owned(),
        other => other.to_owned(),
    }
}

/// The OCI name of the CPU this binary runs on.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The wasme config fields kept as metadata, whichever spelling the publisher used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WasmeMetadata {
    /// Filter type, usually `envoy_proxy`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// ABI versions the module supports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub abi_versions: Vec<String>,
    /// Root ids the module registers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_ids: Vec<String>,
}

/// Reads a wasme config, accepting `abiVersions`/`abi_version(s)` and `rootIds`/`root_ids`
/// both at top level and under `config`, as published images use all of them.
pub fn parse_wasme_config(bytes: &[u8]) -> Result<WasmeMetadata, Error> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::Malformed(format!("wasme config: {e}")))?;
    let scopes = [Some(&value), value.get("config")];
    let strings = |keys: &[&str]| -> Vec<String> {
        for scope in scopes.iter().flatten() {
            for key in keys {
                match scope.get(*key) {
                    Some(serde_json::Value::Array(items)) => {
                        return items
                            .iter()
                            .filter_map(|i| i.as_str().map(str::to_owned))
                            .collect()
                    }
                    Some(serde_json::Value::String(item)) => return vec![item.clone()],
                    _ => {}
                }
            }
        }
        Vec::new()
    };
    Ok(WasmeMetadata {
        kind: value
            .get("type")
            .and_then(|t| t.as_str())
            .map(str::to_owned),
        abi_versions: strings(&["abiVersions", "abi_versions", "abi_version", "abiVersion"]),
        root_ids: strings(&["rootIds", "root_ids"]),
    })
}

/// Parses the digest of a descriptor when it is a sha256 digest.
pub fn sha256_of(descriptor: &Descriptor) -> Option<Digest> {
    descriptor.digest.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn malformed_documents_are_described_without_their_values() {
        let error = parse(
            br#"{"schemaVersion": "SECRET \"quoted\" admin"}"#,
            "amd64",
            8,
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(
            !text.contains("SECRET") && !text.contains("admin"),
            "{text}"
        );
        assert!(
            text.starts_with("malformed manifest: invalid type: string \"…\""),
            "{text}"
        );
        assert!(text.contains("line 1 column"), "{text}");
    }

    fn descriptor(media_type: &str, digest: &str) -> serde_json::Value {
        json!({"mediaType": media_type, "digest": digest, "size": 10})
    }

    fn manifest(media_type: Option<&str>, config: &str, layers: &[(&str, &str)]) -> Vec<u8> {
        let mut value = json!({
            "schemaVersion": 2,
            "config": descriptor(config, D1),
            "layers": layers.iter().map(|(m, d)| descriptor(m, d)).collect::<Vec<_>>(),
        });
        if let Some(media_type) = media_type {
            value["mediaType"] = json!(media_type);
        }
        serde_json::to_vec(&value).unwrap()
    }

    fn parse_test(bytes: &[u8], host: &str) -> Result<Parsed, Error> {
        parse(bytes, host, 64)
    }

    #[test]
    fn too_many_layers_are_refused() {
        let layers: Vec<(&str, &str)> = (0..3).map(|_| (CNCF_LAYER, D1)).collect();
        let error = parse(
            &manifest(Some(OCI_MANIFEST), CNCF_CONFIG, &layers),
            "amd64",
            2,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "manifest has 3 entries, over the limit of 2"
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&bytes, "amd64", 64);
        }

        #[test]
        fn parse_never_panics_on_json_shapes(
            media in proptest::sample::select(vec![OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, "", "x"]),
            layers in proptest::collection::vec(proptest::sample::select(vec![CNCF_LAYER, WASME_LAYER, "application/vnd.oci.image.layer.v1.tar", "y"]), 0..4),
        ) {
            let layers: Vec<(&str, &str)> = layers.into_iter().map(|l| (l, D2)).collect();
            let _ = parse(&manifest(if media.is_empty() { None } else { Some(media) }, CNCF_CONFIG, &layers), "amd64", 64);
        }
    }

    fn plan(bytes: &[u8]) -> ModulePlan {
        match parse(bytes, "amd64", 64).unwrap() {
            Parsed::Image(plan) => plan,
            other => panic!("expected an image, got {other:?}"),
        }
    }

    #[test]
    fn recognises_each_packaging() {
        let cncf = plan(&manifest(
            Some(OCI_MANIFEST),
            CNCF_CONFIG,
            &[(CNCF_LAYER, D2)],
        ));
        assert_eq!(cncf.format, Format::CncfWasm);
        assert_eq!(cncf.layers[0].1, LayerEncoding::Raw);

        let wasme = plan(&manifest(None, WASME_CONFIG, &[(WASME_LAYER, D2)]));
        assert_eq!(wasme.format, Format::Wasme);

        let oci = plan(&manifest(
            Some(OCI_MANIFEST),
            "application/vnd.oci.image.config.v1+json",
            &[
                ("application/vnd.oci.image.layer.v1.tar+gzip", D1),
                ("application/vnd.oci.image.layer.v1.tar", D2),
            ],
        ));
        assert_eq!(oci.format, Format::OciImage);
        assert_eq!(oci.layers[0].0.digest, D2, "last layer is tried first");
        assert_eq!(oci.layers[1].1, LayerEncoding::TarGzip);

        let docker = plan(&manifest(
            Some(DOCKER_MANIFEST),
            "application/vnd.docker.container.image.v1+json",
            &[("application/vnd.docker.image.rootfs.diff.tar.gzip", D2)],
        ));
        assert_eq!(docker.format, Format::DockerImage);
    }

    #[test]
    fn unsupported_names_the_media_types() {
        let error = parse_test(
            &manifest(
                Some(OCI_MANIFEST),
                "application/x-thing",
                &[("text/plain", D2)],
            ),
            "amd64",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("unsupported media type"), "{error}");
        assert!(error.contains("application/x-thing"), "{error}");
        assert!(error.contains("text/plain"), "{error}");
    }

    #[test]
    fn two_wasm_layers_are_ambiguous() {
        let error = parse_test(
            &manifest(
                Some(OCI_MANIFEST),
                CNCF_CONFIG,
                &[(CNCF_LAYER, D1), (CNCF_LAYER, D2)],
            ),
            "amd64",
        )
        .unwrap_err();
        assert!(matches!(error, Error::Ambiguous { count: 2, .. }));
    }

    #[test]
    fn index_prefers_wasm_then_host() {
        let entry = |os: &str, arch: &str, digest: &str| {
            json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": 1,
                   "platform": {"os": os, "architecture": arch}})
        };
        let index = |entries: Vec<serde_json::Value>| {
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                       "manifests": entries}))
            .unwrap()
        };
        let chosen = |bytes: &[u8], arch: &str| match parse(bytes, arch, 64).unwrap() {
            Parsed::Index { chosen } => chosen.digest,
            other => panic!("{other:?}"),
        };
        let both = index(vec![
            entry("linux", "amd64", D1),
            entry("wasip1", "wasm", D2),
        ]);
        assert_eq!(chosen(&both, "amd64"), D2);
        let linux = index(vec![
            entry("linux", "arm64", D2),
            entry("linux", "amd64", D1),
        ]);
        assert_eq!(chosen(&linux, "amd64"), D1);
        let error = parse(&linux, "s390x", 64).unwrap_err().to_string();
        assert!(error.contains("linux/arm64, linux/amd64"), "{error}");
    }

    #[test]
    fn wasme_config_accepts_both_spellings() {
        let camel = parse_wasme_config(
            br#"{"type":"envoy_proxy","abiVersions":["v0-1"],"config":{"rootIds":["a"]}}"#,
        )
        .unwrap();
        let snake =
            parse_wasme_config(br#"{"type":"envoy_proxy","abi_version":"v0-1","root_ids":["a"]}"#)
                .unwrap();
        assert_eq!(camel, snake);
        assert_eq!(camel.root_ids, vec!["a"]);
        assert_eq!(camel.kind.as_deref(), Some("envoy_proxy"));
    }

    #[test]
    fn malformed_documents_are_errors() {
        assert!(matches!(
            parse(b"not json", "amd64", 64),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            parse(br#"{"schemaVersion":1}"#, "amd64", 64),
            Err(Error::Malformed(_))
        ));
    }
}
