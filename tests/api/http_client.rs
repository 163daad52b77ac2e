//! A plain HTTP/1.1 client (hyper's) for the REST tests: one request per
//! connection unless a test asks for keep-alive, the raw status, headers
//! and body back.

use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::helpers::{ORG, TestApp, hs256_token};

pub struct HttpResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "{error}: not JSON: {:?} (status {})",
                String::from_utf8_lossy(&self.body),
                self.status
            )
        })
    }

    /// `error` of an error body, after checking the body's shape: `code` is
    /// the HTTP status, and the `ErrorInfo` detail says the same status and
    /// the same reason.
    pub fn error(&self) -> Value {
        assert_eq!(
            self.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "status {}",
            self.status
        );
        let body = self.json();
        let error = body["error"].clone();
        assert_eq!(error["code"], self.status, "{body}");
        let info = error["details"]
            .as_array()
            .and_then(|details| {
                details
                    .iter()
                    .find(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
            })
            .unwrap_or_else(|| panic!("an ErrorInfo in {body}"));
        assert_eq!(info["reason"], error["reason"], "{body}");
        assert_eq!(info["domain"], "channel-assignment", "{body}");
        assert_eq!(
            info["metadata"]["http_status"],
            self.status.to_string(),
            "{body}"
        );
        let message = error["message"].as_str().unwrap().to_lowercase();
        for leak in [
            "select",
            "insert",
            "constraint",
            "sqlx",
            "postgres",
            "panicked",
        ] {
            assert!(!message.contains(leak), "message leaks {leak:?}: {message}");
        }
        error
    }

    /// Asserts the status, the gRPC code name and the reason of an error.
    pub fn assert_error(&self, status: u16, code: &str, reason: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let error = self.error();
        assert_eq!(error["status"], code, "{error}");
        assert_eq!(error["reason"], reason, "{error}");
        error
    }

    /// The fields of the BadRequest violations of an error.
    pub fn violated_fields(&self) -> Vec<String> {
        let error = self.error();
        error["details"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
            .flat_map(|d| d["fieldViolations"].as_array().unwrap().clone())
            .map(|v| v["field"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// A request as a test builds it.
pub struct Req {
    pub method: http::Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Req {
    pub fn new(method: http::Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn get(path: impl Into<String>) -> Self {
        Self::new(http::Method::GET, path)
    }

    pub fn post(path: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Self::new(http::Method::POST, path)
            .body(body)
            .header("content-type", "application/json")
    }

    pub fn delete(path: impl Into<String>) -> Self {
        Self::new(http::Method::DELETE, path)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// With a bearer token for `org`.
    pub fn for_org(self, org: &str) -> Self {
        self.bearer(&hs256_token(org))
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    fn build(&self, address: SocketAddr) -> http::Request<Full<bytes::Bytes>> {
        let mut builder = http::Request::builder()
            .method(self.method.clone())
            .uri(&self.path)
            .header("host", address.to_string());
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Full::new(bytes::Bytes::from(
                self.body.clone().unwrap_or_default(),
            )))
            .expect("a valid request")
    }

    /// Sends it on a connection of its own.
    pub async fn send(&self, address: SocketAddr) -> HttpResponse {
        let mut connection = Connection::open(address).await;
        connection.send(self).await
    }
}

/// A keep-alive connection: requests one after the other.
pub struct Connection {
    sender: http1::SendRequest<Full<bytes::Bytes>>,
    address: SocketAddr,
    _closed: tokio::task::JoinHandle<()>,
}

impl Connection {
    pub async fn open(address: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("the REST port accepts connections");
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        let closed = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self {
            sender,
            address,
            _closed: closed,
        }
    }

    pub async fn send(&mut self, request: &Req) -> HttpResponse {
        self.try_send(request).await.expect("a response")
    }

    pub async fn try_send(&mut self, request: &Req) -> Result<HttpResponse, hyper::Error> {
        self.sender.ready().await?;
        let response = self
            .sender
            .send_request(request.build(self.address))
            .await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes().to_vec();
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

/// The path segment for `raw`, percent-encoded as a client would.
pub fn segment(raw: &str) -> String {
    let mut encoded = String::new();
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'@') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

impl TestApp {
    /// Sends `request` to the app's REST port.
    pub async fn http(&self, request: Req) -> HttpResponse {
        request.send(self.http_addr).await
    }

    /// POST /identities/{handle}/{mailbox|phone_number} as ORG.
    pub async fn http_assign(&self, kind_path: &str, handle: &str, body: &str) -> HttpResponse {
        self.http(
            Req::post(format!("/identities/{}/{kind_path}", segment(handle)), body).for_org(ORG),
        )
        .await
    }
}
