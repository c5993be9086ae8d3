//! Part of the `wasmcache` binary (not the library): what `wasmcache inspect` reports about a
//! module, from its bytes (read by [`wasmcache::wasm`]) and what the cache knows about them,
//! as text or JSON. Getting the bytes and the fetch answer is `main.rs`'s.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use wasmcache::format::WasmeMetadata;
use wasmcache::wasm::{self, ModuleInfo};
use wasmcache::{Digest, Fetched};

/// What `inspect` shows; serialised, its JSON.
#[derive(serde::Serialize)]
pub struct Inspection {
    /// The reference as normalised; absent for a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    /// The packaging, or `file`.
    format: String,
    /// The digest the reference resolved to.
    #[serde(skip_serializing_if = "Option::is_none")]
    resolved_digest: Option<Digest>,
    /// The image manifest's digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest_digest: Option<Digest>,
    /// The image index's digest, when the reference named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    index_digest: Option<Digest>,
    /// The manifest's annotations, when the cache keeps the manifest (artifact packagings).
    annotations: BTreeMap<String, String>,
    /// The wasme config's fields, for wasme images.
    #[serde(skip_serializing_if = "Option::is_none")]
    wasme: Option<WasmeMetadata>,
    /// `sha256:<hex>` of the module.
    digest: Digest,
    /// Module size in bytes.
    size: u64,
    /// The module file (the file given, or the cache's).
    path: PathBuf,
    /// What the module's bytes say.
    #[serde(flatten)]
    module: ModuleInfo,
    /// The wasme config's `abiVersions` the module does not export.
    unclaimed_abi: Vec<String>,
    /// One line per problem found.
    warnings: Vec<String>,
}

impl Inspection {
    /// The inspection of `bytes`, read from `path`, with what the cache answered for them
    /// (`None` for a file) and the manifest it keeps, if any.
    pub fn of(
        bytes: &[u8],
        path: PathBuf,
        fetched: Option<&Fetched>,
        manifest: Option<&[u8]>,
    ) -> Result<Inspection, wasm::Error> {
        let module = wasm::analyse(bytes)?;
        let wasme = fetched.and_then(|fetched| fetched.wasme.clone());
        let claimed = wasme.as_ref().map_or(&[][..], |w| &w.abi_versions[..]);
        let unclaimed_abi = wasm::unclaimed_abi(claimed, &module.proxy_wasm_abi);
        let mut warnings = Vec::new();
        if !unclaimed_abi.is_empty() {
            let exported = if module.proxy_wasm_abi.is_empty() {
                "none".to_owned()
            } else {
                module.proxy_wasm_abi.join(", ")
            };
            warnings.push(format!(
                "the wasme config claims proxy-wasm ABI {}, which the module does not export \
                 (it exports: {exported})",
                unclaimed_abi.join(", ")
            ));
        }
        Ok(Inspection {
            reference: fetched.map(|f| f.reference.clone()),
            format: fetched.map_or("file".to_owned(), |f| f.format.to_string()),
            resolved_digest: fetched.map(|f| f.resolved_digest.clone()),
            manifest_digest: fetched.map(|f| f.manifest_digest.clone()),
            index_digest: fetched.and_then(|f| f.index_digest.clone()),
            annotations: manifest.map(annotations_of).unwrap_or_default(),
            wasme,
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
            path,
            module,
            unclaimed_abi,
            warnings,
        })
    }

    /// The text report: one `label: value` line per field, a list's items indented below
    /// its label, then one `warning:` line per warning.
    pub fn render(&self) -> String {
        let mut out = Report::default();
        if let Some(reference) = &self.reference {
            out.field("reference:", reference);
        }
        out.field("format:", &self.format);
        if let Some(digest) = &self.resolved_digest {
            out.field("resolved_digest:", digest);
        }
        if let Some(digest) = &self.manifest_digest {
            out.field("manifest_digest:", digest);
        }
        if let Some(digest) = &self.index_digest {
            out.field("index_digest:", digest);
        }
        if self.reference.is_some() {
            let annotations = self
                .annotations
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()));
            out.list("annotations:", annotations);
        }
        if let Some(wasme) = &self.wasme {
            out.field("abi_versions:", &wasme.abi_versions.join(", "));
            out.field("root_ids:", &wasme.root_ids.join(", "));
        }
        out.field("digest:", &self.digest);
        out.field("size:", &self.size);
        out.field("path:", &self.path.display());
        let kind = match self.module.kind {
            wasm::Kind::Core => "core module",
            wasm::Kind::Component => "component",
        };
        out.field("kind:", &kind);
        let imports = self.module.imports.iter();
        out.list(
            "imports:",
            imports.map(|(m, names)| (m.as_str(), names.join(", "))),
        );
        out.field("exports:", &self.module.exports.join(", "));
        let abi = &self.module.proxy_wasm_abi;
        out.field(
            "proxy_wasm_abi:",
            &if abi.is_empty() {
                "none".to_owned()
            } else {
                abi.join(", ")
            },
        );
        for warning in &self.warnings {
            out.line(format_args!("warning: {warning}"));
        }
        out.0
    }
}

/// Text being rendered.
#[derive(Default)]
struct Report(String);

impl Report {
    /// Width of a field's label column.
    const LABEL_WIDTH: usize = 17;

    fn line(&mut self, text: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.0, "{text}");
    }

    /// `label value`, the values aligned.
    fn field(&mut self, label: &str, value: &dyn std::fmt::Display) {
        self.line(format_args!(
            "{label:<width$}{value}",
            width = Self::LABEL_WIDTH
        ));
    }

    /// `label none`, or the label alone and each `  key: value` below it (`  key` for an
    /// empty value).
    fn list<'a>(&mut self, label: &str, items: impl Iterator<Item = (&'a str, String)>) {
        let mut items = items.peekable();
        if items.peek().is_none() {
            return self.field(label, &"none");
        }
        self.line(format_args!("{label}"));
        for (key, value) in items {
            if value.is_empty() {
                self.line(format_args!("  {key}"));
            } else {
                self.line(format_args!("  {key}: {value}"));
            }
        }
    }
}

/// A manifest's own `annotations` (string values only).
fn annotations_of(manifest: &[u8]) -> BTreeMap<String, String> {
    let json: serde_json::Value = serde_json::from_slice(manifest).unwrap_or_default();
    let Some(annotations) = json.get("annotations").and_then(|a| a.as_object()) else {
        return BTreeMap::new();
    };
    annotations
        .iter()
        .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
        .collect()
}
