//! Module references: parsing and normalising `[oci://]registry[:port]/repository[:tag][@digest]`,
//! and `http(s)://` URLs of a module, as Istio and Envoy accept them.
//!
//! The grammar follows the OCI distribution / Docker reference grammar, so a reference that
//! `docker pull` or `oras pull` accepts is accepted here and names the same thing. Docker Hub
//! short forms are expanded (`envoy` → `docker.io/library/envoy:latest`). This module knows
//! nothing about the network; `registry` turns a [`Reference`] into requests.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// Registry assumed when a reference names none, as Docker does.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Tag assumed when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// The prefix Istio's `WasmPlugin.url` uses for OCI references.
pub const OCI_SCHEME: &str = "oci://";
/// Longest repository name the distribution spec allows (registry excluded).
const MAX_NAME_LENGTH: usize = 255;
/// Longest tag the distribution spec allows.
const MAX_TAG_LENGTH: usize = 128;

/// The schemes of module URLs fetched over HTTP.
pub const HTTP_SCHEMES: [&str; 2] = ["http", "https"];

/// A normalised reference to a module in a registry, or the URL of a module served over
/// HTTP(S).
///
/// Invariant: for a registry reference, `tag` or `digest` (or both) is set and `registry`
/// and `repository` are valid. For a URL, `url` is set, `registry` is its `host[:port]` (as
/// policies name hosts), `repository` its path, and neither tag nor digest is set: a URL is
/// mutable, re-checked like a tag.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
    url: Option<String>,
}

/// Why a reference could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid reference '{input}': {reason}")]
pub struct ParseError {
    /// The text that failed to parse, as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Reference {
    /// Registry host, with port when one was given (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path inside the registry (`library/envoy`, `org/filters/auth`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The manifest digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The module's `http(s)://` URL, normalised, when the reference is one.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// Whether resolving this reference can give a different answer over time.
    pub fn is_mutable(&self) -> bool {
        self.digest.is_none()
    }

    /// The same repository pinned to `digest` (the tag is dropped).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
            url: None,
        }
    }

    /// The same repository with `tag` (the digest is dropped).
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_owned()),
            digest: None,
            url: None,
        }
    }

    /// The same repository, tag and digest on another registry (a mirror).
    pub fn with_registry(&self, registry: &str) -> Reference {
        Reference {
            registry: registry.to_owned(),
            ..self.clone()
        }
    }

    /// The registry and repository, without tag or digest (a URL: the URL).
    pub fn name(&self) -> String {
        match &self.url {
            Some(url) => url.clone(),
            None => format!("{}/{}", self.registry, self.repository),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(url) = &self.url {
            return f.write_str(url);
        }
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Reference {
    type Err = ParseError;

    fn from_str(input: &str) -> Result<Reference, ParseError> {
        parse(input).map_err(|reason| ParseError {
            input: input.to_owned(),
            reason,
        })
    }
}

impl serde::Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

fn parse(input: &str) -> Result<Reference, String> {
    if input.is_empty() {
        return Err("reference is empty".into());
    }
    if input.trim() != input {
        return Err("reference has leading or trailing white space".into());
    }
    let rest = match input.split_once("://") {
        Some(("oci", rest)) => rest,
        Some((scheme, _)) if HTTP_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) => {
            return parse_url(input)
        }
        Some((scheme, _)) => {
            return Err(format!(
            "unsupported scheme '{scheme}://' (only '{OCI_SCHEME}', 'http://', 'https://' or none)"
        ))
        }
        None => input,
    };

    let (name_and_tag, digest) = match rest.split_once('@') {
        Some((name, digest)) => {
            let digest = digest
                .parse::<Digest>()
                .map_err(|error| format!("digest '{}': {}", error.input, error.reason))?;
            (name, Some(digest))
        }
        None => (rest, None),
    };

    // A ':' after the last '/' starts the tag; an earlier one is the registry's port.
    let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
        Some(i) => {
            let i = last_slash + i;
            (&name_and_tag[..i], Some(&name_and_tag[i + 1..]))
        }
        None => (name_and_tag, None),
    };
    if let Some(tag) = tag {
        validate_tag(tag)?;
    }

    let (registry, repository) = split_registry(name)?;
    validate_repository(&repository)?;
    let tag = match (tag, &digest) {
        (Some(tag), _) => Some(tag.to_owned()),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_TAG.to_owned()),
    };
    Ok(Reference {
        registry,
        repository,
        tag,
        digest,
        url: None,
    })
}

/// Parses an `http(s)://` module URL: a host is required; credentials in the URL and
/// fragments are refused (a reference is logged, stored and shown).
fn parse_url(input: &str) -> Result<Reference, String> {
    let url = url::Url::parse(input).map_err(|error| format!("not a valid URL: {error}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in a URL are not accepted; configure them instead".into());
    }
    if url.fragment().is_some() {
        return Err("a URL with a fragment ('#…') is not accepted".into());
    }
    let host = match url.host() {
        Some(url::Host::Domain(name)) if !name.is_empty() => name.to_owned(),
        Some(url::Host::Ipv4(address)) => address.to_string(),
        Some(url::Host::Ipv6(address)) => format!("[{address}]"),
        _ => return Err("the URL names no host".into()),
    };
    let registry = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    };
    Ok(Reference {
        registry,
        repository: url.path().trim_start_matches('/').to_owned(),
        tag: None,
        digest: None,
        url: Some(url.to_string()),
    })
}

/// Splits `name` into registry and repository the way Docker does: the first component is a
/// registry only if it looks like a host (has a '.', a ':' or is `localhost`).
fn split_registry(name: &str) -> Result<(String, String), String> {
    if name.is_empty() {
        return Err("repository name is empty".into());
    }
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first.starts_with('[')
                || first == "localhost" =>
        {
            validate_registry(first)?;
            (first.to_owned(), rest.to_owned())
        }
        _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
    };
    let registry = match registry.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY.to_owned(),
        _ => registry,
    };
    let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    Ok((registry, repository))
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((address, after)) = rest.split_once(']') else {
            return Err(format!(
                "registry '{registry}': unclosed '[' in IPv6 address"
            ));
        };
        if address.is_empty() || !address.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err(format!("registry '{registry}': invalid IPv6 address"));
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(format!("registry '{registry}': junk after IPv6 address")),
            },
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let valid_label = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if !host.split('.').all(valid_label) {
            return Err(format!(
                "registry '{registry}': '{host}' is not a valid host name"
            ));
        }
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("registry '{registry}': invalid port '{port}'"));
        }
    }
    Ok(())
}

fn validate_repository(repository: &str) -> Result<(), String> {
    if repository.len() > MAX_NAME_LENGTH {
        return Err(format!(
            "repository name is {} characters long (at most {MAX_NAME_LENGTH})",
            repository.len()
        ));
    }
    for component in repository.split('/') {
        if !valid_path_component(component) {
            return Err(format!(
                "repository '{repository}': component '{component}' must be lowercase letters, \
                 digits and single separators ('.', '_', '__', '-')"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*` from the distribution spec.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let valid = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !valid {
            return false;
        }
    }
    true
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let valid = !tag.is_empty()
        && tag.len() <= MAX_TAG_LENGTH
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "tag '{tag}' must be 1 to {MAX_TAG_LENGTH} of [A-Za-z0-9_.-], not starting with '.' or '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parsed(input: &str) -> String {
        input.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn normalises_field_forms() {
        assert_eq!(parsed("envoy"), "docker.io/library/envoy:latest");
        assert_eq!(parsed("user/filter:v1"), "docker.io/user/filter:v1");
        assert_eq!(parsed("index.docker.io/user/f"), "docker.io/user/f:latest");
        assert_eq!(
            parsed("oci://ghcr.io/org/filters/auth:1.2.3"),
            "ghcr.io/org/filters/auth:1.2.3"
        );
        assert_eq!(
            parsed("127.0.0.1:5000/wasm/add"),
            "127.0.0.1:5000/wasm/add:latest"
        );
        assert_eq!(parsed("localhost/add:v2"), "localhost/add:v2");
        assert_eq!(parsed("[::1]:5000/add:v2"), "[::1]:5000/add:v2");
        assert_eq!(
            parsed(&format!("localhost:5000/add@sha256:{HEX}")),
            format!("localhost:5000/add@sha256:{HEX}")
        );
        assert_eq!(
            parsed(&format!("localhost:5000/add:v1@sha256:{HEX}")),
            format!("localhost:5000/add:v1@sha256:{HEX}")
        );
    }

    #[test]
    fn splits_parts() {
        let reference: Reference = "oci://registry.local:5000/org/add:v1".parse().unwrap();
        assert_eq!(reference.registry(), "registry.local:5000");
        assert_eq!(reference.repository(), "org/add");
        assert_eq!(reference.tag(), Some("v1"));
        assert_eq!(reference.digest(), None);
        assert!(reference.is_mutable());
    }

    #[test]
    fn errors_quote_the_input_and_say_why() {
        for (input, why) in [
            ("", "empty"),
            ("ftp://ghcr.io/a/b", "unsupported scheme 'ftp://'"),
            ("https://user:pw@example.com/m.wasm", "credentials in a URL"),
            ("https://example.com/m.wasm#x", "fragment"),
            ("http://:80/m.wasm", "not a valid URL"),
            ("ghcr.io/Org/b", "component 'Org'"),
            ("ghcr.io/a/b:", "tag ''"),
            ("ghcr.io/a/b:-x", "tag '-x'"),
            ("ghcr.io/a/b@sha256:abc", "expected 64"),
            ("ghcr.io/a/b@md5:abc", "only sha256"),
            ("ghcr.io:99999/a", "invalid port"),
            ("ghcr.io/a//b", "component ''"),
            (" ghcr.io/a", "white space"),
        ] {
            let error = input.parse::<Reference>().unwrap_err();
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("invalid reference '{input}': ")),
                "{message}"
            );
            assert!(message.contains(why), "{message} should contain {why}");
        }
    }

    #[test]
    fn module_urls_are_references_named_by_their_host() {
        let reference: Reference = "HTTPS://Example.COM:8443/filters/a.wasm?v=2"
            .parse()
            .unwrap();
        assert_eq!(
            reference.url(),
            Some("https://example.com:8443/filters/a.wasm?v=2")
        );
        assert_eq!(reference.registry(), "example.com:8443");
        assert_eq!(reference.to_string(), reference.url().unwrap());
        assert!(reference.is_mutable() && reference.tag().is_none());
        let plain: Reference = "http://[::1]/m.wasm".parse().unwrap();
        assert_eq!(plain.registry(), "[::1]");
        let default_port: Reference = "https://example.com:443/m.wasm".parse().unwrap();
        assert_eq!(default_port.registry(), "example.com");
        assert_eq!(
            default_port.to_string().parse::<Reference>().unwrap(),
            default_port
        );
    }

    fn reference_strategy() -> impl Strategy<Value = String> {
        let host = prop_oneof![
            Just(String::new()),
            "[a-z]([a-z0-9-]{0,6}[a-z0-9])?\\.[a-z]{2,3}/",
            "localhost:[1-9][0-9]{0,3}/",
            "127\\.0\\.0\\.1:[1-9][0-9]{0,3}/",
        ];
        // Without a host, a first component with a '.' would be read as a registry.
        let repo =
            "[a-z0-9]{1,6}([_-][a-z0-9]{1,4}){0,2}(/[a-z0-9]{1,6}([._-][a-z0-9]{1,3})?){0,2}";
        let tag = prop_oneof![Just(String::new()), ":[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}"];
        let digest = prop_oneof![Just(String::new()), Just(format!("@sha256:{HEX}"))];
        (host, repo, tag, digest).prop_map(|(h, r, t, d)| format!("{h}{r}{t}{d}"))
    }

    proptest! {
        #[test]
        fn parse_never_panics(input in "\\PC{0,64}") {
            let _ = input.parse::<Reference>();
        }

        #[test]
        fn display_round_trips(input in reference_strategy()) {
            let reference: Reference = input.parse().unwrap();
            let again: Reference = reference.to_string().parse().unwrap();
            prop_assert_eq!(again, reference);
        }
    }
}
