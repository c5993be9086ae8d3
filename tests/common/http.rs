//! A small blocking HTTP client for talking to test registries from synchronous code.
//!
//! It drives the `curl` CLI so that one code path covers plain HTTP, basic auth and TLS with the
//! test CA; the library under test has its own client, and this one only sets up and inspects
//! fixtures.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Where a registry listens and how to reach it: address, optional credentials and test CA.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Basic-auth user and password, sent with every request when set.
    pub credentials: Option<(String, String)>,
    /// The CA certificate of a TLS endpoint; `None` means plain HTTP.
    pub ca_cert: Option<PathBuf>,
}

/// A fully read HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body (empty for HEAD).
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as (lossy) UTF-8, for assertions and panic messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Endpoint {
    /// A plain-HTTP endpoint without credentials.
    pub fn plain(addr: impl Into<String>) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            credentials: None,
            ca_cert: None,
        }
    }

    /// The same endpoint, sending basic-auth credentials.
    pub fn with_credentials(mut self, user: &str, password: &str) -> Endpoint {
        self.credentials = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.ca_cert.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The absolute URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme(), self.addr)
    }

    /// Sends one request, panicking if no HTTP response came back at all.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|error| panic!("{method} {}: {error}", self.url(path)))
    }

    /// A GET with the given headers.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request("GET", path, headers, None)
    }

    /// Sends one request; `Err` describes a connection-level failure (refused, timed out).
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, String> {
        let scratch = tempfile::tempdir().expect("scratch dir for curl");
        let header_file = scratch.path().join("headers");
        let body_file = scratch.path().join("body");
        let mut curl = Command::new(super::require_tool("curl"));
        super::isolate(&mut curl, scratch.path());
        curl.args(["--silent", "--show-error", "--max-time", "60"])
            .args(["--write-out", "%{http_code}"])
            .arg("--dump-header")
            .arg(&header_file)
            .arg("--output")
            .arg(&body_file)
            // Without this curl waits for `100 Continue` before sending large bodies.
            .args(["--header", "Expect:"]);
        if method == "HEAD" {
            curl.arg("--head");
        } else {
            curl.args(["--request", method]);
        }
        for (name, value) in headers {
            curl.arg("--header").arg(format!("{name}: {value}"));
        }
        if let Some(body) = body {
            let upload = scratch.path().join("upload");
            fs::write(&upload, body).expect("writing a request body");
            if !headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
            {
                curl.args(["--header", "Content-Type: application/octet-stream"]);
            }
            curl.arg("--data-binary")
                .arg(format!("@{}", upload.display()));
        }
        if let Some((user, password)) = &self.credentials {
            curl.arg("--user").arg(format!("{user}:{password}"));
        }
        if let Some(ca) = &self.ca_cert {
            curl.arg("--cacert").arg(ca);
        }
        curl.arg(self.url(path));

        let output = super::run_with_timeout(&mut curl, Duration::from_secs(90));
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        let status = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| format!("curl printed no status: {output:?}"))?;
        let raw_headers = fs::read_to_string(&header_file).unwrap_or_default();
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            fs::read(&body_file).unwrap_or_default()
        };
        Ok(Response {
            status,
            headers: parse_headers(&raw_headers),
            body,
        })
    }
}

/// Parses the last header block curl dumped (earlier ones would be interim responses).
fn parse_headers(raw: &str) -> Vec<(String, String)> {
    let last_block = raw
        .split("\r\n\r\n")
        .filter(|block| block.starts_with("HTTP/"))
        .last()
        .unwrap_or("");
    last_block
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect()
}

impl From<&str> for Endpoint {
    fn from(addr: &str) -> Endpoint {
        Endpoint::plain(addr)
    }
}

impl From<String> for Endpoint {
    fn from(addr: String) -> Endpoint {
        Endpoint::plain(addr)
    }
}

impl From<&String> for Endpoint {
    fn from(addr: &String) -> Endpoint {
        Endpoint::plain(addr.as_str())
    }
}

impl From<&Endpoint> for Endpoint {
    fn from(endpoint: &Endpoint) -> Endpoint {
        endpoint.clone()
    }
}
