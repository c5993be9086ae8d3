//! `wasmcache push`: a module file checked, packaged and written to a registry under a tag.
//!
//! The module is checked as a pulled one is ([`crate::fetch::ModuleCheck`]: magic number,
//! version, wasmparser validation) before any request. It is packaged as one of two of the
//! packagings `format` reads (see `shared/README.md`):
//!
//! - a CNCF Wasm artifact (TAG Runtime's wasm-oci layout): an OCI image manifest with
//!   `artifactType` and config `application/vnd.wasm.config.v0+json` (`created`, `author`
//!   from the `org.opencontainers.image.authors` annotation, `architecture: wasm`, `os: wasip1`, or `wasip2` with the `component`'s imports and
//!   exports, `layerDigests`), and one `application/wasm` layer;
//! - a solo.io wasme image: config `application/vnd.module.wasm.config.v1+json`
//!   (`type: envoy_proxy`, `abiVersions`, `config.rootIds`), sent again as the first of two
//!   layers before the module's, as `wasme push` did and as Istio's agent requires.
//!
//! `created` is the file's modification time, so pushing one file twice writes the same
//! config and the same manifest. Blobs the repository holds are not sent again; what is sent
//! goes up in one request, or in chunks of [`registry::UPLOAD_CHUNK_BYTES`] read from the file as they
//! go. The registry client speaks the protocol; this module decides what goes up.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use crate::digest::Digest;
use crate::fetch::ModuleCheck;
use crate::format::{Format, CNCF_CONFIG, CNCF_LAYER, OCI_MANIFEST, WASME_CONFIG, WASME_LAYER};
use crate::reference::Reference;
use crate::registry::{self, RegistryClient};

/// The layer annotation oras and wasme name a layer's file by.
const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// The manifest annotation whose value becomes the CNCF config's `author`.
const AUTHORS_ANNOTATION: &str = "org.opencontainers.image.authors";
/// The file name wasme gives its runtime config layer.
const WASME_CONFIG_TITLE: &str = "runtime-config.json";
/// The wasme `type` of a proxy-wasm filter.
const WASME_TYPE: &str = "envoy_proxy";
/// How much of the file is read at a time while it is checked.
const READ_BYTES: usize = 256 << 10;
/// Version and layer fields of a component (a core module's are `01 00 00 00`).
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0, 1, 0];

/// Which packaging to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packaging {
    /// The CNCF Wasm artifact.
    Cncf,
    /// solo.io's wasme image.
    Wasme,
}

impl Packaging {
    /// The name `wasmcache pull` reports for it.
    pub fn format(self) -> Format {
        match self {
            Packaging::Cncf => Format::CncfWasm,
            Packaging::Wasme => Format::Wasme,
        }
    }
}

/// What to write besides the module.
#[derive(Debug, Clone)]
pub struct Options {
    /// The packaging.
    pub packaging: Packaging,
    /// wasme's `abiVersions` (proxy-wasm ABI versions the module speaks).
    pub abi_versions: Vec<String>,
    /// wasme's `rootIds`.
    pub root_ids: Vec<String>,
    /// The manifest's `annotations`.
    pub annotations: BTreeMap<String, String>,
}

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct Pushed {
    /// The reference written, with its tag.
    pub reference: String,
    /// The digest of the manifest the tag now names.
    pub manifest_digest: Digest,
    /// The module's sha256.
    pub digest: Digest,
    /// The module's size in bytes.
    pub size: u64,
    /// The packaging, as `wasmcache pull` names it.
    pub format: Format,
    /// Blobs sent to the registry.
    pub uploaded_blobs: usize,
    /// Blobs the repository already held.
    pub skipped_blobs: usize,
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A push names a tag; a digest is what it produces.
    #[error("pushing to {reference}: name a tag, not a digest (the manifest's digest is printed)")]
    DigestReference {
        /// The reference.
        reference: String,
    },
    /// An `http(s)://` URL is no registry.
    #[error("pushing to {reference}: a module URL is not a registry repository")]
    UrlReference {
        /// The reference.
        reference: String,
    },
    /// wasme metadata asked for with the CNCF packaging, which has no place for it.
    #[error("{option} describes a wasme image; add --format wasme")]
    WasmeOnly {
        /// The option given.
        option: &'static str,
    },
    /// An annotation that is not `KEY=VALUE`.
    #[error("annotation '{input}': expected KEY=VALUE with a non-empty KEY")]
    Annotation {
        /// What was given.
        input: String,
    },
    /// The module file could not be read.
    #[error("reading module {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid WebAssembly module or component.
    #[error("{path} is not a valid WebAssembly module: {reason}")]
    NotWasm {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file changed size while it was pushed.
    #[error("{path} changed while it was pushed ({expected} bytes checked)")]
    Changed {
        /// The file.
        path: PathBuf,
        /// Its size when it was checked.
        expected: u64,
    },
    /// The registry refused or failed a step.
    #[error("pushing {reference}: {step}")]
    Registry {
        /// The reference.
        reference: String,
        /// What was being done.
        step: String,
        /// What the registry said.
        #[source]
        source: Box<registry::Error>,
    },
}

/// Parses `KEY=VALUE` annotations; a later one for the same key wins.
pub fn parse_annotations(pairs: &[String]) -> Result<BTreeMap<String, String>, Error> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_owned(), value.to_owned()))
            }
            _ => Err(Error::Annotation {
                input: pair.clone(),
            }),
        })
        .collect()
}

/// Checks the module in `file`, then writes it to `reference` (a tag) as `options` say.
/// Nothing is sent when the reference, the options or the module are refused.
pub async fn push_module(
    registry: &RegistryClient,
    file: &Path,
    reference: &Reference,
    options: &Options,
) -> Result<Pushed, Error> {
    check_request(reference, options)?;
    let module = {
        let file = file.to_owned();
        tokio::task::spawn_blocking(move || check_file(&file))
            .await
            .expect("checking a module file panicked")?
    };
    let file_name = (file.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "module.wasm".to_owned());
    let artifact = package(&module, &file_name, options);
    let (mut uploaded_blobs, mut skipped_blobs) = (0, 0);
    for blob in &artifact.blobs {
        let step = format!("checking for blob {}", blob.digest);
        if (registry.blob_exists(reference, &blob.digest).await)
            .map_err(at_step(reference, step))?
        {
            tracing::debug!(digest = %blob.digest, "the repository holds it already");
            skipped_blobs += 1;
            continue;
        }
        let source = match &blob.bytes {
            Some(bytes) => Source::Memory(bytes.clone()),
            None => Source::File(open(file).await?),
        };
        upload(registry, reference, blob, source, file).await?;
        uploaded_blobs += 1;
    }
    let manifest_digest = registry
        .put_manifest(reference, artifact.manifest, OCI_MANIFEST)
        .await
        .map_err(at_step(reference, "putting the manifest".to_owned()))?;
    Ok(Pushed {
        reference: reference.to_string(),
        manifest_digest,
        digest: module.digest,
        size: module.size,
        format: options.packaging.format(),
        uploaded_blobs,
        skipped_blobs,
    })
}

/// Turns a registry error into one that names the reference and the step it failed at.
fn at_step(reference: &Reference, step: String) -> impl FnOnce(registry::Error) -> Error {
    let reference = reference.to_string();
    move |source| Error::Registry {
        reference,
        step,
        source: Box::new(source),
    }
}

/// Refuses what cannot be pushed before the file is even read.
fn check_request(reference: &Reference, options: &Options) -> Result<(), Error> {
    if reference.url().is_some() {
        return Err(Error::UrlReference {
            reference: reference.to_string(),
        });
    }
    if reference.digest().is_some() {
        return Err(Error::DigestReference {
            reference: reference.to_string(),
        });
    }
    if options.packaging == Packaging::Cncf {
        if !options.abi_versions.is_empty() {
            return Err(Error::WasmeOnly {
                option: "--abi-version",
            });
        }
        if !options.root_ids.is_empty() {
            return Err(Error::WasmeOnly {
                option: "--root-id",
            });
        }
    }
    Ok(())
}

/// What the check found out about a module file.
#[derive(Debug, Clone)]
struct Module {
    digest: Digest,
    size: u64,
    /// The file's modification time (the CNCF config's `created`).
    modified: SystemTime,
    /// A component's top-level imports and exports; `None` for a core module.
    component: Option<Component>,
}

/// A component's interface, as the CNCF config lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Component {
    imports: Vec<String>,
    exports: Vec<String>,
}

/// Reads `path` once: hashes it and checks it as a pulled module is checked. Blocking.
fn check_file(path: &Path) -> Result<Module, Error> {
    let read_error = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let modified = (file.metadata())
        .and_then(|metadata| metadata.modified())
        .map_err(read_error)?;
    let (mut check, mut hasher, mut size) = (ModuleCheck::default(), Sha256::new(), 0u64);
    let mut buffer = vec![0; READ_BYTES];
    loop {
        let n = file.read(&mut buffer).map_err(read_error)?;
        if n == 0 {
            break;
        }
        check.feed(&buffer[..n]);
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    let name = path.display().to_string();
    let code = check.finish(&name).map_err(|error| match error {
        crate::fetch::Error::NotWasm { reason, .. } => Error::NotWasm {
            path: path.to_owned(),
            reason,
        },
        other => Error::NotWasm {
            path: path.to_owned(),
            reason: crate::error::error_chain(&other),
        },
    })?;
    Ok(Module {
        digest: Digest::from_hasher(hasher),
        size,
        modified,
        component: (code.get(4..8) == Some(&COMPONENT_VERSION[..])).then(|| interface(&code)),
    })
}

/// The top-level imports and exports of a (validated) component.
fn interface(code: &[u8]) -> Component {
    use wasmparser::Payload;
    let mut component = Component::default();
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(code) {
        let Ok(payload) = payload else { break };
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                let names = reader.into_iter().flatten();
                component
                    .imports
                    .extend(names.map(|import| import.name.full_name().into_owned()));
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                let names = reader.into_iter().flatten();
                component
                    .exports
                    .extend(names.map(|export| export.name.full_name().into_owned()));
            }
            _ => {}
        }
    }
    component
}

/// A blob of an artifact: the config (bytes in hand) or the module (read from the file).
#[derive(Debug, Clone)]
struct Blob {
    digest: Digest,
    size: u64,
    /// `None`: the module file.
    bytes: Option<Bytes>,
}

/// What goes up: the distinct blobs, then the manifest.
#[derive(Debug, Clone)]
struct Artifact {
    blobs: Vec<Blob>,
    manifest: Bytes,
}

/// Builds the config and the manifest of `module` (named `file_name` in its layer's title).
/// Pure: the same module, name and options give the same bytes.
fn package(module: &Module, file_name: &str, options: &Options) -> Artifact {
    let (config_media_type, layer_media_type) = match options.packaging {
        Packaging::Cncf => (CNCF_CONFIG, CNCF_LAYER),
        Packaging::Wasme => (WASME_CONFIG, WASME_LAYER),
    };
    let config = match options.packaging {
        Packaging::Cncf => cncf_config(module, options),
        Packaging::Wasme => json!({
            "type": WASME_TYPE,
            "abiVersions": options.abi_versions,
            "config": {"rootIds": options.root_ids},
        }),
    };
    let config = Bytes::from(config.to_string());
    let config_digest = Digest::of(&config);
    let descriptor = |media_type: &str, digest: &Digest, size: u64, title: Option<&str>| {
        let mut descriptor = json!({"mediaType": media_type, "digest": digest, "size": size});
        if let Some(title) = title {
            descriptor["annotations"] = json!({ TITLE_ANNOTATION: title });
        }
        descriptor
    };
    let config_descriptor =
        descriptor(config_media_type, &config_digest, config.len() as u64, None);
    let module_layer = descriptor(
        layer_media_type,
        &module.digest,
        module.size,
        Some(file_name),
    );
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_descriptor,
    });
    match options.packaging {
        Packaging::Cncf => {
            manifest["artifactType"] = json!(CNCF_CONFIG);
            manifest["layers"] = json!([module_layer]);
        }
        Packaging::Wasme => {
            let config_layer = descriptor(
                WASME_CONFIG,
                &config_digest,
                config.len() as u64,
                Some(WASME_CONFIG_TITLE),
            );
            manifest["layers"] = json!([config_layer, module_layer]);
        }
    }
    if !options.annotations.is_empty() {
        manifest["annotations"] = json!(options.annotations);
    }
    Artifact {
        blobs: vec![
            Blob {
                digest: config_digest,
                size: config.len() as u64,
                bytes: Some(config),
            },
            Blob {
                digest: module.digest.clone(),
                size: module.size,
                bytes: None,
            },
        ],
        manifest: Bytes::from(manifest.to_string()),
    }
}

/// The CNCF config: `wasip1` for a core module, `wasip2` and its interface for a component.
fn cncf_config(module: &Module, options: &Options) -> Value {
    let created = humantime::format_rfc3339_seconds(module.modified).to_string();
    let mut config = json!({
        "created": created,
        "architecture": "wasm",
        "os": "wasip1",
        "layerDigests": [module.digest],
    });
    if let Some(author) = options.annotations.get(AUTHORS_ANNOTATION) {
        config["author"] = json!(author);
    }
    if let Some(component) = &module.component {
        config["os"] = json!("wasip2");
        config["component"] = json!({
            "imports": component.imports,
            "exports": component.exports,
        });
    }
    config
}

/// Where a blob's bytes come from while it is uploaded.
enum Source {
    Memory(Bytes),
    File(tokio::fs::File),
}

impl Source {
    /// The next `length` bytes.
    async fn read(&mut self, length: u64) -> std::io::Result<Bytes> {
        match self {
            Source::Memory(bytes) => {
                let length = (length as usize).min(bytes.len());
                Ok(bytes.split_to(length))
            }
            Source::File(file) => {
                let mut buffer = vec![0; length as usize];
                file.read_exact(&mut buffer).await?;
                Ok(Bytes::from(buffer))
            }
        }
    }
}

async fn open(path: &Path) -> Result<tokio::fs::File, Error> {
    (tokio::fs::File::open(path).await).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Uploads `blob`: in one request when it fits a chunk, else in chunks and a closing request.
async fn upload(
    registry: &RegistryClient,
    reference: &Reference,
    blob: &Blob,
    mut source: Source,
    path: &Path,
) -> Result<(), Error> {
    let step = |doing: &str| {
        at_step(
            reference,
            format!("{doing} blob {} ({} bytes)", blob.digest, blob.size),
        )
    };
    let read_error = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Changed {
            path: path.to_owned(),
            expected: blob.size,
        },
        _ => Error::Read {
            path: path.to_owned(),
            source,
        },
    };
    let mut session = registry
        .start_upload(reference)
        .await
        .map_err(step("starting the upload of"))?;
    let chunk = session.chunk_bytes();
    let last = if blob.size <= chunk {
        source.read(blob.size).await.map_err(read_error)?
    } else {
        while session.offset() < blob.size {
            let length = chunk.min(blob.size - session.offset());
            let bytes = source.read(length).await.map_err(read_error)?;
            registry
                .upload_chunk(reference, &mut session, bytes)
                .await
                .map_err(step("uploading a chunk of"))?;
        }
        Bytes::new()
    };
    tracing::debug!(digest = %blob.digest, size = blob.size, "uploaded");
    registry
        .finish_upload(reference, session, &blob.digest, last)
        .await
        .map_err(step("finishing the upload of"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> Module {
        Module {
            digest: Digest::of(b"module"),
            size: 6,
            modified: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            component: None,
        }
    }

    fn options(packaging: Packaging) -> Options {
        Options {
            packaging,
            abi_versions: Vec::new(),
            root_ids: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }

    fn parsed(bytes: &Bytes) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn cncf_artifacts_follow_the_wasm_oci_layout() {
        let mut options = options(Packaging::Cncf);
        options.annotations = parse_annotations(&[
            "org.opencontainers.image.authors=Ada".into(),
            "note=a=b".into(),
        ])
        .unwrap();
        let artifact = package(&module(), "add.wasm", &options);
        let manifest = parsed(&artifact.manifest);
        assert_eq!(manifest["mediaType"], OCI_MANIFEST);
        assert_eq!(manifest["artifactType"], CNCF_CONFIG);
        assert_eq!(manifest["config"]["mediaType"], CNCF_CONFIG);
        assert_eq!(manifest["layers"][0]["mediaType"], CNCF_LAYER);
        assert_eq!(manifest["layers"][0]["digest"], module().digest.to_string());
        assert_eq!(
            manifest["layers"][0]["annotations"][TITLE_ANNOTATION],
            "add.wasm"
        );
        assert_eq!(manifest["annotations"]["note"], "a=b");
        let config = parsed(artifact.blobs[0].bytes.as_ref().unwrap());
        assert_eq!(
            config,
            json!({"created": "2023-11-14T22:13:20Z", "author": "Ada", "architecture": "wasm",
                   "os": "wasip1", "layerDigests": [module().digest]})
        );
        assert_eq!(
            manifest["config"]["digest"],
            artifact.blobs[0].digest.to_string()
        );
        // The same inputs, the same bytes: a second push changes nothing.
        assert_eq!(
            package(&module(), "add.wasm", &options).manifest,
            artifact.manifest
        );
        // A component is `wasip2`, with its interface.
        let component = Module {
            component: Some(Component {
                imports: vec!["wasi:cli/environment@0.2.0".into()],
                exports: vec!["wasi:http/incoming-handler@0.2.0".into()],
            }),
            ..module()
        };
        let artifact = package(&component, "c.wasm", &options);
        let config = parsed(artifact.blobs[0].bytes.as_ref().unwrap());
        assert_eq!(config["os"], "wasip2");
        assert_eq!(
            config["component"]["exports"],
            json!(["wasi:http/incoming-handler@0.2.0"])
        );
    }

    #[test]
    fn wasme_images_carry_their_config_as_a_first_layer() {
        let mut options = options(Packaging::Wasme);
        options.abi_versions = vec!["v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f".into()];
        options.root_ids = vec!["add_header".into()];
        let artifact = package(&module(), "filter.wasm", &options);
        let manifest = parsed(&artifact.manifest);
        let config = &artifact.blobs[0];
        assert_eq!(manifest["config"]["mediaType"], WASME_CONFIG);
        assert_eq!(manifest.get("artifactType"), None);
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0]["mediaType"], WASME_CONFIG);
        assert_eq!(layers[0]["digest"], config.digest.to_string());
        assert_eq!(layers[1]["mediaType"], WASME_LAYER);
        assert_eq!(manifest.get("annotations"), None);
        let metadata = crate::format::parse_wasme_config(config.bytes.as_ref().unwrap()).unwrap();
        assert_eq!(metadata.kind.as_deref(), Some(WASME_TYPE));
        assert_eq!(metadata.abi_versions, options.abi_versions);
        assert_eq!(metadata.root_ids, options.root_ids);
        // What `format` makes of it: a wasme image whose module is the second layer.
        let plan = match crate::format::parse(&artifact.manifest, "amd64", 64).unwrap() {
            crate::format::Parsed::Image(plan) => plan,
            other => panic!("{other:?}"),
        };
        assert_eq!(plan.format, Format::Wasme);
        assert_eq!(plan.layers[0].0.digest, module().digest.to_string());
    }

    #[test]
    fn refusals_come_before_any_reading() {
        let reference: Reference = "127.0.0.1:5000/a/b:v1".parse().unwrap();
        let mut cncf = options(Packaging::Cncf);
        assert!(check_request(&reference, &cncf).is_ok());
        cncf.root_ids = vec!["x".into()];
        let refused = check_request(&reference, &cncf).unwrap_err().to_string();
        assert_eq!(
            refused,
            "--root-id describes a wasme image; add --format wasme"
        );
        let pinned = reference.with_digest(Digest::of(b"m"));
        let refused = check_request(&pinned, &options(Packaging::Wasme)).unwrap_err();
        assert!(
            matches!(refused, Error::DigestReference { .. }),
            "{refused}"
        );
        for bad in ["novalue", "=v", " =v"] {
            let refused = parse_annotations(&[bad.into()]).unwrap_err().to_string();
            assert!(refused.contains(bad), "{refused}");
        }
    }

    #[test]
    fn files_are_checked_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.wasm");
        // The smallest valid module: magic and version.
        std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
        let module = check_file(&path).unwrap();
        assert_eq!(module.digest, Digest::of(b"\0asm\x01\0\0\0"));
        assert_eq!((module.size, module.component), (8, None));
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        let refused = check_file(&path).unwrap_err().to_string();
        assert!(
            refused.contains("m.wasm is not a valid WebAssembly module"),
            "{refused}"
        );
        assert!(refused.contains("magic number"), "{refused}");
        // The smallest component: its interface is empty.
        std::fs::write(&path, b"\0asm\x0d\0\x01\0").unwrap();
        assert_eq!(
            check_file(&path).unwrap().component,
            Some(Component::default())
        );
    }
}
