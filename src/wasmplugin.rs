//! `wasmcache wasmplugin`: an Istio `WasmPlugin` that loads a module as the node's daemon
//! holds it. This module decides the `url` and `sha256` for each way of loading it and
//! renders the YAML; asking the daemon (and pinning) is the CLI's.
//!
//! | `--via` | `url`                                                          | `sha256`     |
//! |---------|----------------------------------------------------------------|--------------|
//! | `oci`   | `oci://<daemon>/<alias or host>/<repository>@<manifest>`       | the manifest |
//! | `http`  | `http://<daemon>/v1/modules/<module>?ref=<reference@manifest>` | the module   |
//! | `file`  | `file://<data dir>/blobs/sha256/<hex>` (pinned first)          | the module   |
//!
//! Istio's agent (`pkg/wasm/imagefetcher.go`) reads Docker and OCI images with `plugin.wasm`
//! in their last layer, and wasme artifacts of exactly two layers; the OCI view serves CNCF
//! and wasme artifacts only, so `oci` is for wasme artifacts. For an `oci://` URL the agent
//! compares `sha256` with the digest of the image manifest it reads (`img.Digest()`, after an
//! index is resolved to a platform); the view serves the manifest the daemon chose, so the
//! URL is pinned to that manifest and `sha256` is its digest, which is `resolved_digest`
//! whenever the reference names a manifest. `http` and `file` take any packaging: Istio
//! compares `sha256` with the module bytes for an `http://` URL, and hands a `file://` path to
//! Envoy as it is.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::config::RegistryAlias;
use crate::fetch::Fetched;
use crate::format::Format;
use crate::reference::Reference;

/// Where generated URLs reach the node's daemon: the node-local Service
/// (`deploy/kubernetes/examples/node-local-service.yaml`) on the DaemonSet's HTTP port.
pub const DEFAULT_DAEMON_ADDRESS: &str = "wasmcache.wasmcache.svc.cluster.local:9977";

/// Longest line (indentation and key included) that keeps a quoted `url` on its key's line;
/// a longer URL goes on a line of its own, where YAML linters accept any length.
const MAX_URL_LINE: usize = 100;

/// How the proxy loads the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Istio's agent pulls it through the daemon's OCI view.
    Oci,
    /// Istio's agent downloads it from the daemon's module API.
    Http,
    /// Envoy reads the daemon's module file from a read-only mount.
    File,
}

impl Via {
    /// The `--via` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Oci => "oci",
            Via::Http => "http",
            Via::File => "file",
        }
    }
}

/// Why no `WasmPlugin` could be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// `--via oci` for a packaging Istio cannot read through the OCI view.
    #[error("--via oci: {reference} is a {format} packaging, {why}; use --via http or --via file")]
    NotThroughView {
        /// The reference, as normalised.
        reference: String,
        /// Its packaging.
        format: Format,
        /// What stands in the way.
        why: &'static str,
    },
    /// `--via oci` for a registry the OCI view can name only through an alias.
    #[error(
        "--via oci: the OCI view names registry {registry} only through a registry alias: \
         add `[registry_aliases.<name>] host = \"{registry}\"` to the daemon's config and \
         give this command the same config"
    )]
    NoAlias {
        /// `host:port` of the registry.
        registry: String,
    },
    /// `--daemon-address` is not `host[:port]`.
    #[error("invalid daemon address '{0}': expected host[:port]")]
    DaemonAddress(String),
    /// A name, namespace or label that Kubernetes would refuse.
    #[error("invalid {what} '{value}': {reason}")]
    Invalid {
        /// Which input.
        what: &'static str,
        /// The input, as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The daemon named a module file that cannot be a `file://` URL.
    #[error("--via file: the daemon's module file '{0}' is not an absolute path of printable characters")]
    Path(String),
}

/// `host[:port]` of the node's daemon in generated URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonAddress(String);

impl DaemonAddress {
    /// Checks that `address` is `host[:port]`, as the reference parser reads a registry.
    pub fn parse(address: &str) -> Result<DaemonAddress, Error> {
        let probe = format!("{address}/probe:probe").parse::<Reference>();
        match probe {
            Ok(reference) if reference.registry() == address => {
                Ok(DaemonAddress(address.to_owned()))
            }
            _ => Err(Error::DaemonAddress(address.to_owned())),
        }
    }
}

impl std::fmt::Display for DaemonAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `WasmPlugin`'s identity and the workloads it selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (none: kubectl's current namespace).
    pub namespace: Option<String>,
    /// `spec.selector.matchLabels` (none: every workload of the namespace).
    pub selector: Vec<(String, String)>,
}

impl Metadata {
    /// Checks the inputs as Kubernetes would; `selectors` are `key=value`.
    pub fn parse(
        name: String,
        namespace: Option<String>,
        selectors: &[String],
    ) -> Result<Metadata, Error> {
        check_subdomain("name", &name)?;
        if let Some(namespace) = &namespace {
            check_label("namespace", namespace)?;
        }
        let mut selector: Vec<(String, String)> = Vec::new();
        for text in selectors {
            let (key, value) = parse_selector(text)?;
            if selector.iter().any(|(seen, _)| *seen == key) {
                return Err(invalid("selector", text, "the label is selected twice"));
            }
            selector.push((key, value));
        }
        Ok(Metadata {
            name,
            namespace,
            selector,
        })
    }
}

/// Where the proxy finds the module, and what the daemon must keep for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// `spec.url`.
    pub url: String,
    /// `spec.sha256`: 64 hex characters.
    pub sha256: String,
    /// The reference to pin before the plugin is used (for `file`): the module's manifest by
    /// digest, so that a tag moving on does not let the file go.
    pub pin: Option<Reference>,
    /// Comment lines for the YAML.
    pub notes: Vec<String>,
}

/// A `WasmPlugin` to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmPlugin {
    /// Name, namespace and selector.
    pub metadata: Metadata,
    /// `spec.url`.
    pub url: String,
    /// `spec.sha256`.
    pub sha256: String,
    /// Comment lines above the document (no line breaks).
    pub comments: Vec<String>,
}

/// Decides `url` and `sha256` for loading `fetched` (the daemon's answer for `reference`)
/// `via` the daemon at `daemon_address`; `aliases` are the config's `registry_aliases`.
pub fn source(
    via: Via,
    reference: &Reference,
    fetched: &Fetched,
    aliases: &BTreeMap<String, RegistryAlias>,
    daemon_address: &DaemonAddress,
) -> Result<Source, Error> {
    // A module URL has no digest form: it is pinned as it is.
    let pinned = match reference.url() {
        Some(_) => reference.clone(),
        None => reference.with_digest(fetched.manifest_digest.clone()),
    };
    let mut notes = vec![
        format!(
            "wasmcache wasmplugin --via {}: the module as the node's daemon holds it, from",
            via.as_str()
        ),
        reference.to_string(),
    ];
    let source = match via {
        Via::Oci => {
            let why = match fetched.format {
                Format::Wasme => None,
                Format::CncfWasm => {
                    Some("which Istio's agent does not read (one application/wasm layer)")
                }
                Format::OciImage | Format::DockerImage => {
                    Some("which the OCI view does not serve (it keeps only the extracted module)")
                }
                Format::Http => Some("a module URL, which has no registry the OCI view could name"),
            };
            if let Some(why) = why {
                return Err(Error::NotThroughView {
                    reference: fetched.reference.clone(),
                    format: fetched.format,
                    why,
                });
            }
            let name = view_name(reference, aliases)?;
            notes.push(
                "Through the daemon's OCI view, pinned to the manifest it serves; Istio reads \
                 wasme artifacts of two layers."
                    .into(),
            );
            Source {
                url: format!("oci://{daemon_address}/{name}@{}", fetched.manifest_digest),
                sha256: fetched.manifest_digest.hex().to_owned(),
                pin: None,
                notes,
            }
        }
        Via::Http => {
            notes.push(
                "From the daemon's module API; a daemon without the module fetches `ref` first."
                    .into(),
            );
            Source {
                url: format!(
                    "http://{daemon_address}/v1/modules/{}?ref={}",
                    fetched.digest,
                    encode_query_value(&pinned.to_string())
                ),
                sha256: fetched.digest.hex().to_owned(),
                pin: None,
                notes,
            }
        }
        Via::File => {
            let path = fetched
                .path
                .to_str()
                .filter(|path| path.starts_with('/') && path.chars().all(|c| !c.is_control()))
                .ok_or_else(|| Error::Path(fetched.path.display().to_string()))?;
            notes.push(
                "From the daemon's cache directory, which the proxy mounts read-only; the module \
                 is pinned as"
                    .into(),
            );
            notes.push(pinned.to_string());
            Source {
                url: format!("file://{path}"),
                sha256: fetched.digest.hex().to_owned(),
                pin: Some(pinned),
                notes,
            }
        }
    };
    Ok(source)
}

/// The YAML of `plugin`: block style, every value a double-quoted scalar (escaped as YAML
/// requires), a long URL on a line of its own.
pub fn render(plugin: &WasmPlugin) -> String {
    let mut out = String::new();
    for line in &plugin.comments {
        let line: String = line.chars().filter(|&c| printable(c)).collect();
        match line.trim() {
            "" => out.push_str("#\n"),
            line => {
                let _ = writeln!(out, "# {line}");
            }
        }
    }
    out.push_str("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n");
    let _ = writeln!(out, "  name: {}", quoted(&plugin.metadata.name));
    if let Some(namespace) = &plugin.metadata.namespace {
        let _ = writeln!(out, "  namespace: {}", quoted(namespace));
    }
    out.push_str("spec:\n");
    if !plugin.metadata.selector.is_empty() {
        out.push_str("  selector:\n    matchLabels:\n");
        for (key, value) in &plugin.metadata.selector {
            let _ = writeln!(out, "      {}: {}", quoted(key), quoted(value));
        }
    }
    let url = quoted(&plugin.url);
    let block = !plugin.url.is_empty() && plugin.url.bytes().all(|b| b.is_ascii_graphic());
    if "  url: ".len() + url.len() > MAX_URL_LINE && block {
        let _ = writeln!(out, "  url: >-\n    {}", plugin.url);
    } else {
        let _ = writeln!(out, "  url: {url}");
    }
    let _ = writeln!(out, "  sha256: {}", quoted(&plugin.sha256));
    out
}

/// A YAML double-quoted scalar holding exactly `text`: quotes, backslashes and every
/// character outside YAML's printable set (or that YAML 1.1 reads as a line break) escaped.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            _ if printable(c) => out.push(c),
            _ => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

/// Whether `c` may appear as itself in a YAML scalar or comment: YAML's printable set, less
/// the characters YAML 1.1 reads as line breaks and the byte order mark.
fn printable(c: char) -> bool {
    matches!(c, ' '..='~' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
        && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

/// How the OCI view names `reference`'s repository: `<alias>/<repository>` for a registry
/// with an alias, `<host>/<repository>` for a host without a port (see `api::oci`).
fn view_name(
    reference: &Reference,
    aliases: &BTreeMap<String, RegistryAlias>,
) -> Result<String, Error> {
    let registry = reference.registry();
    let repository = reference.repository();
    if let Some((alias, _)) = aliases
        .iter()
        .find(|(_, alias)| alias.host.eq_ignore_ascii_case(registry))
    {
        return Ok(format!("{alias}/{repository}"));
    }
    let host_like = !registry.contains(':') && (registry.contains('.') || registry == "localhost");
    if host_like && !aliases.contains_key(registry) {
        return Ok(format!("{registry}/{repository}"));
    }
    Err(Error::NoAlias {
        registry: registry.to_owned(),
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode_query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3 / 2);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `key=value` of a label selector.
fn parse_selector(text: &str) -> Result<(String, String), Error> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| invalid("selector", text, "expected key=value"))?;
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        check_subdomain("selector", prefix)
            .map_err(|_| invalid("selector", text, "the key's prefix is not a DNS subdomain"))?;
    }
    if !is_label_value(name) || name.is_empty() {
        return Err(invalid(
            "selector",
            text,
            "the key's name is 1 to 63 letters, digits, '-', '_' or '.', starting and ending \
             with a letter or digit",
        ));
    }
    if !is_label_value(value) {
        return Err(invalid(
            "selector",
            text,
            "the value is up to 63 letters, digits, '-', '_' or '.', starting and ending with a \
             letter or digit",
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// A label value: empty, or up to 63 alphanumerics, `-`, `_`, `.`, alphanumeric at both ends.
fn is_label_value(text: &str) -> bool {
    let edges = |b: Option<&u8>| b.is_none_or(u8::is_ascii_alphanumeric);
    text.len() <= 63
        && edges(text.as_bytes().first())
        && edges(text.as_bytes().last())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// An RFC 1123 label: 1 to 63 lowercase alphanumerics or `-`, alphanumeric at both ends.
fn check_label(what: &'static str, text: &str) -> Result<(), Error> {
    let alphanumeric = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = text.as_bytes();
    let valid = (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(alphanumeric)
        && bytes.last().is_some_and(alphanumeric)
        && bytes.iter().all(|b| alphanumeric(b) || *b == b'-');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            what,
            text,
            "expected 1 to 63 lowercase letters, digits or '-', starting and ending with a \
             letter or digit",
        ))
    }
}

/// An RFC 1123 subdomain: dot-separated labels, 253 characters at most.
fn check_subdomain(what: &'static str, text: &str) -> Result<(), Error> {
    let valid = text.len() <= 253
        && text
            .split('.')
            .all(|label| check_label(what, label).is_ok());
    if valid {
        Ok(())
    } else {
        Err(invalid(
            what,
            text,
            "expected lowercase letters, digits, '-' and '.' (a DNS subdomain of at most 253 \
             characters)",
        ))
    }
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> Error {
    Error::Invalid {
        what,
        value: value.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use proptest::prelude::*;

    use super::*;
    use crate::digest::Digest;

    const MODULE: &str = "f61fd62f57c41269c3c23f360eeaf1090b1db9c38651106674d48bc65dba88ba";
    const MANIFEST: &str = "1e15992caeb87956f177eec981fee9d587344d2bf3e52dee0208e08720b4e4f3";
    const INDEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn fetched(reference: &str, format: Format, index: bool) -> Fetched {
        let manifest = Digest::from_hex(MANIFEST).unwrap();
        let index_digest = index.then(|| Digest::from_hex(INDEX).unwrap());
        Fetched {
            reference: reference.parse::<Reference>().unwrap().to_string(),
            resolved_digest: index_digest.clone().unwrap_or_else(|| manifest.clone()),
            manifest_digest: manifest,
            index_digest,
            digest: Digest::from_hex(MODULE).unwrap(),
            size: 41,
            format,
            path: PathBuf::from(format!("/var/lib/wasmcache/blobs/sha256/{MODULE}")),
            cache_hit: true,
            stale: false,
            resolved_at: 0,
            wasme: None,
            proxy_wasm_abi: Vec::new(),
            signature: None,
        }
    }

    fn aliases(entries: &[(&str, &str)]) -> BTreeMap<String, RegistryAlias> {
        entries
            .iter()
            .map(|(alias, host)| {
                let target = RegistryAlias {
                    host: (*host).to_owned(),
                    insecure: true,
                    ca_file: None,
                };
                ((*alias).to_owned(), target)
            })
            .collect()
    }

    fn plan(via: Via, reference: &str, format: Format, index: bool) -> Result<Source, Error> {
        let parsed: Reference = reference.parse().unwrap();
        let fetched = fetched(reference, format, index);
        let aliases = aliases(&[("hub", "registry.example.com:5000")]);
        let address = DaemonAddress::parse(DEFAULT_DAEMON_ADDRESS).unwrap();
        source(via, &parsed, &fetched, &aliases, &address)
    }

    /// The document as YAML readers see it.
    fn parse(yaml: &str) -> serde_json::Value {
        serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("not YAML: {e}\n{yaml}"))
    }

    #[test]
    fn oci_pins_the_manifest_the_view_serves() {
        let source = plan(
            Via::Oci,
            "registry.example.com:5000/filters/add:v1",
            Format::Wasme,
            false,
        )
        .unwrap();
        assert_eq!(
            source.url,
            format!("oci://{DEFAULT_DAEMON_ADDRESS}/hub/filters/add@sha256:{MANIFEST}")
        );
        assert_eq!(source.sha256, MANIFEST);
        assert_eq!(source.pin, None);

        // A host without a port names itself; an index's platform manifest is what is served.
        let source = plan(Via::Oci, "ghcr.io/example/add:v1", Format::Wasme, true).unwrap();
        assert_eq!(
            source.url,
            format!("oci://{DEFAULT_DAEMON_ADDRESS}/ghcr.io/example/add@sha256:{MANIFEST}")
        );
        assert_eq!(source.sha256, MANIFEST, "not the index's {INDEX}");
    }

    #[test]
    fn oci_refuses_what_istio_cannot_read_through_the_view() {
        for format in [Format::CncfWasm, Format::OciImage, Format::DockerImage] {
            let error = plan(Via::Oci, "ghcr.io/example/add:v1", format, false).unwrap_err();
            assert!(
                matches!(&error, Error::NotThroughView { format: f, .. } if *f == format),
                "{error}"
            );
            let message = error.to_string();
            assert!(message.contains("ghcr.io/example/add:v1"), "{message}");
            assert!(message.contains("--via http"), "{message}");
        }
        let error = plan(
            Via::Oci,
            "127.0.0.1:5000/filters/add:v1",
            Format::Wasme,
            false,
        );
        assert_eq!(
            error.unwrap_err(),
            Error::NoAlias {
                registry: "127.0.0.1:5000".into()
            }
        );
    }

    #[test]
    fn http_names_the_module_and_its_pinned_reference() {
        let source = plan(
            Via::Http,
            "registry.example.com:5000/filters/add:v1",
            Format::CncfWasm,
            true,
        )
        .unwrap();
        assert_eq!(
            source.url,
            format!(
                "http://{DEFAULT_DAEMON_ADDRESS}/v1/modules/sha256:{MODULE}?ref=\
                 registry.example.com%3A5000%2Ffilters%2Fadd%40sha256%3A{MANIFEST}"
            )
        );
        assert_eq!(source.sha256, MODULE);
        assert_eq!(source.pin, None);
    }

    #[test]
    fn file_names_the_module_file_and_pins_its_manifest() {
        let source = plan(Via::File, "ghcr.io/example/add:v1", Format::OciImage, false).unwrap();
        assert_eq!(
            source.url,
            format!("file:///var/lib/wasmcache/blobs/sha256/{MODULE}")
        );
        assert_eq!(source.sha256, MODULE);
        let pin = source.pin.unwrap();
        assert_eq!(
            pin.to_string(),
            format!("ghcr.io/example/add@sha256:{MANIFEST}")
        );
        assert!(!pin.is_mutable());
    }

    #[test]
    fn bad_daemon_addresses_are_refused() {
        for address in [
            "",
            "wasmcache",
            "host:port",
            "a b:1",
            "http://host:1",
            "host:1/x",
        ] {
            assert_eq!(
                DaemonAddress::parse(address),
                Err(Error::DaemonAddress(address.into())),
                "{address}"
            );
        }
        for address in [
            "localhost:9977",
            "10.0.0.7:9977",
            "[::1]:9977",
            "wasmcache.local",
        ] {
            let parsed = DaemonAddress::parse(address).unwrap();
            assert_eq!(parsed.to_string(), address);
        }
    }

    #[test]
    fn metadata_is_checked_as_kubernetes_would() {
        let selectors = ["app.kubernetes.io/name=add".to_owned(), "tier=".to_owned()];
        let metadata =
            Metadata::parse("add".into(), Some("istio-system".into()), &selectors).unwrap();
        assert_eq!(
            metadata.selector,
            [
                ("app.kubernetes.io/name".to_owned(), "add".to_owned()),
                ("tier".to_owned(), String::new())
            ]
        );
        for (name, namespace, selector) in [
            ("Add", None, "a=b"),
            ("add", Some("istio.system"), "a=b"),
            ("add", None, "novalue"),
            ("add", None, "=b"),
            ("add", None, "a=b c"),
            ("add", None, "Bad_Prefix/a=b"),
            ("-add", None, "a=b"),
        ] {
            let result = Metadata::parse(
                name.into(),
                namespace.map(str::to_owned),
                &[selector.to_owned()],
            );
            assert!(
                matches!(result, Err(Error::Invalid { .. })),
                "{name} {namespace:?} {selector}: {result:?}"
            );
        }
        let twice = ["a=b".to_owned(), "a=c".to_owned()];
        assert!(Metadata::parse("add".into(), None, &twice).is_err());
    }

    #[test]
    fn renders_a_wasmplugin_that_reads_back() {
        let source = plan(
            Via::Http,
            "registry.example.com:5000/filters/add:v1",
            Format::Wasme,
            false,
        )
        .unwrap();
        let selectors = ["istio=ingressgateway".to_owned(), "version=1.0".to_owned()];
        let plugin = WasmPlugin {
            metadata: Metadata::parse("add".into(), Some("istio-system".into()), &selectors)
                .unwrap(),
            url: source.url.clone(),
            sha256: source.sha256.clone(),
            comments: source.notes.clone(),
        };
        let yaml = render(&plugin);
        let document = parse(&yaml);
        assert_eq!(
            document,
            serde_json::json!({
                "apiVersion": "extensions.istio.io/v1alpha1",
                "kind": "WasmPlugin",
                "metadata": {"name": "add", "namespace": "istio-system"},
                "spec": {
                    "selector": {"matchLabels": {"istio": "ingressgateway", "version": "1.0"}},
                    "url": source.url,
                    "sha256": MODULE,
                },
            })
        );
        // The long URL sits on a line of its own; every comment line is a comment.
        assert!(yaml.contains("  url: >-\n    http://"), "{yaml}");
        assert!(
            yaml.lines().take(3).all(|line| line.starts_with("# ")),
            "{yaml}"
        );

        // No namespace, no selector: neither is written.
        let bare = WasmPlugin {
            metadata: Metadata::parse("add".into(), None, &[]).unwrap(),
            comments: Vec::new(),
            ..plugin
        };
        let document = parse(&render(&bare));
        assert!(document["metadata"].get("namespace").is_none());
        assert!(document["spec"].get("selector").is_none());
    }

    #[test]
    fn scalars_that_look_like_other_types_stay_strings() {
        let plugin = WasmPlugin {
            metadata: Metadata {
                name: "true".into(),
                namespace: Some("null".into()),
                selector: vec![("1".into(), "1e5".into()), ("on".into(), "~".into())],
            },
            url: "file:///a b/#c: d".into(),
            sha256: "1234567890123456789012345678901234567890123456789012345678901234".into(),
            comments: vec!["a\nb".into()],
        };
        let document = parse(&render(&plugin));
        assert_eq!(document["metadata"]["name"], "true");
        assert_eq!(document["metadata"]["namespace"], "null");
        assert_eq!(document["spec"]["selector"]["matchLabels"]["1"], "1e5");
        assert_eq!(document["spec"]["selector"]["matchLabels"]["on"], "~");
        assert_eq!(document["spec"]["url"], "file:///a b/#c: d");
        assert_eq!(document["spec"]["sha256"], plugin.sha256);
    }

    proptest! {
        #[test]
        fn render_reads_back_whatever_the_strings(
            name in any::<String>(),
            namespace in proptest::option::of(any::<String>()),
            selector in proptest::collection::btree_map(any::<String>(), any::<String>(), 0..4),
            url in any::<String>(),
            sha256 in any::<String>(),
            comment in any::<String>(),
        ) {
            let plugin = WasmPlugin {
                metadata: Metadata {
                    name,
                    namespace,
                    selector: selector.into_iter().collect(),
                },
                url,
                sha256,
                comments: vec![comment],
            };
            let document = parse(&render(&plugin));
            prop_assert_eq!(&document["metadata"]["name"], &plugin.metadata.name);
            match &plugin.metadata.namespace {
                Some(namespace) => prop_assert_eq!(&document["metadata"]["namespace"], namespace),
                None => prop_assert!(document["metadata"].get("namespace").is_none()),
            }
            for (key, value) in &plugin.metadata.selector {
                prop_assert_eq!(&document["spec"]["selector"]["matchLabels"][key], value);
            }
            prop_assert_eq!(&document["spec"]["url"], &plugin.url);
            prop_assert_eq!(&document["spec"]["sha256"], &plugin.sha256);
        }
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode_query_value("a.b-c_d~e/f:g@h+i j%"),
            "a.b-c_d~e%2Ff%3Ag%40h%2Bi%20j%25"
        );
    }
}
