//! A small HTTP/1.1 client (hyper) for fixtures and for the daemon's HTTP API: blocking over
//! TCP to a registry or server ([`Endpoint`]), async over the daemon's unix socket
//! ([`super::daemon::unix_request`]). The library under test has its own client.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncWrite};

/// Where a registry listens: address and optional basic-auth credentials.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Basic-auth user and password, sent with every request when set.
    pub credentials: Option<(String, String)>,
}

/// A fully read HTTP response (the body is empty for HEAD).
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Response {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The body as (lossy) UTF-8, for assertions and panic messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        let json = serde_json::from_slice(&self.body);
        json.unwrap_or_else(|error| panic!("{}: {error}", self.text()))
    }
}

impl Endpoint {
    /// A plain-HTTP endpoint without credentials.
    pub fn plain(addr: impl Into<String>) -> Endpoint {
        let addr = addr.into();
        Endpoint {
            addr,
            credentials: None,
        }
    }

    /// Sends one request, panicking if no HTTP response came back at all.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        let response = self.try_request(method, path, headers, body);
        response.unwrap_or_else(|error| panic!("{method} http://{}{path}: {error}", self.addr))
    }

    /// A GET with the given headers.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request("GET", path, headers, None)
    }

    /// Sends one request on a new connection; `Err` describes a connection-level failure
    /// (refused, timed out). A body without a `Content-Type` goes as `octet-stream`.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, String> {
        let mut headers = headers.to_vec();
        let typed = |(name, _): &(&str, &str)| name.eq_ignore_ascii_case("content-type");
        if body.is_some() && !headers.iter().any(typed) {
            headers.push(("Content-Type", "application/octet-stream"));
        }
        let basic = self.credentials.as_ref().map(|(user, password)| {
            format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
        });
        if let Some(basic) = &basic {
            headers.push(("Authorization", basic));
        }
        let body = body.unwrap_or_default().to_vec();
        let send = async {
            let stream = tokio::net::TcpStream::connect(&self.addr).await;
            let stream = stream.map_err(|error| error.to_string())?;
            send(stream, &self.addr, method, path, &headers, body).await
        };
        // On a thread and runtime of their own, so that async tests may call it too.
        std::thread::scope(|scope| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let runtime = runtime.expect("a runtime for the HTTP client");
            let answer = scope.spawn(move || runtime.block_on(send)).join();
            answer.expect("the HTTP client panicked")
        })
    }
}

/// Sends one HTTP/1.1 request on a connected `stream` and reads the whole answer, within 60 s.
pub async fn send(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Response, String> {
    let exchange = async {
        let stream = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(stream).await?;
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(bytes::Bytes::from(body)))
            .expect("a request");
        let (head, body) = sender.send_request(request).await?.into_parts();
        let body = body.collect().await?.to_bytes().to_vec();
        Ok::<_, hyper::Error>(Response {
            status: head.status.as_u16(),
            headers: head.headers,
            body,
        })
    };
    match tokio::time::timeout(Duration::from_secs(60), exchange).await {
        Ok(answer) => answer.map_err(|error| error.to_string()),
        Err(_) => Err(format!("no answer to {method} {path} within 60 s")),
    }
}

/// An address (`127.0.0.1:PORT`) is a plain endpoint.
macro_rules! endpoint_from_address {
    ($($address:ty),*) => {$(
        impl From<$address> for Endpoint {
            fn from(addr: $address) -> Endpoint {
                Endpoint::plain(addr.to_string())
            }
        }
    )*};
}
endpoint_from_address!(&str, String, &String);

impl From<&Endpoint> for Endpoint {
    fn from(endpoint: &Endpoint) -> Endpoint {
        endpoint.clone()
    }
}

/// One of the Prometheus counters the daemon at `address` serves (0 when absent).
pub fn counter(address: &str, series: &str) -> u64 {
    let metrics = Endpoint::plain(address).get("/metrics", &[]).text();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}
