//! A raw HTTP/2 gRPC client (the `h2` crate): sends exactly the frames a
//! test asks for, and no deadline of its own, so that a test sees what the
//! server itself answers — or that it answers nothing.

use std::net::SocketAddr;

use bytes::Bytes;
use h2::client::SendRequest;
use prost::Message;
use tonic::Status;

pub struct RawConnection {
    send: SendRequest<Bytes>,
}

/// What the server sent for one call.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: Status,
}

impl RawConnection {
    pub async fn connect(address: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let send = send.ready().await.unwrap();
        Self { send }
    }

    /// A gRPC request's head: POST to `path` with `headers` added.
    pub fn head(path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap()
    }

    /// Sends one unary call with `payload` as its (already encoded) message
    /// and reads the whole answer.
    pub async fn unary(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> RawAnswer {
        self.send = self.send.clone().ready().await.unwrap();
        let (response, mut body) = self
            .send
            .send_request(Self::head(path, headers), false)
            .unwrap();
        body.send_data(grpc_frame(payload), true).unwrap();
        let response = response.await.unwrap();
        let (head, mut body) = response.into_parts();
        // An error comes trailers-only: its status in the headers.
        if let Some(status) = Status::from_header_map(&head.headers) {
            return RawAnswer { status };
        }
        while let Some(chunk) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.unwrap().len());
        }
        let trailers = body.trailers().await.unwrap().unwrap_or_default();
        let status = Status::from_header_map(&trailers).expect("a grpc-status trailer");
        RawAnswer { status }
    }
}

impl RawConnection {
    /// Opens a stream whose headers are sent but whose body never comes.
    pub async fn open_without_body(
        &mut self,
        path: &str,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
        self.open(path, &[]).await
    }

    /// Opens a stream and sends its headers; the body is the caller's.
    pub async fn open(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
        self.send = self.send.clone().ready().await?;
        self.send.send_request(Self::head(path, headers), false)
    }
}

/// A message in gRPC's length-prefixed framing, uncompressed.
pub fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(payload.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

pub fn encode(message: &impl Message) -> Vec<u8> {
    message.encode_to_vec()
}
