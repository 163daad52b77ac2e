//! A TCP proxy between the service and PostgreSQL that a test can cut and
//! restore: a cut closes every open connection and refuses new ones, as a
//! network partition or a database failover would. It also counts what the
//! service sends: the reads it makes of the service's side are its writes,
//! one per round trip of a request-response protocol.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};

pub struct Proxy {
    pub port: u16,
    up: watch::Sender<bool>,
    sends: Arc<AtomicU64>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, up_rx) = watch::channel(true);
        let sends = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&sends);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*up_rx.borrow() {
                    // Refused: closed at once, like a host that is gone.
                    drop(inbound);
                    continue;
                }
                let mut cut = up_rx.clone();
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut from_service, mut to_service) = inbound.split();
                    let (mut from_database, mut to_database) = outbound.split();
                    let upstream = async {
                        let mut buffer = vec![0; 64 * 1024];
                        loop {
                            match from_service.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(read) => {
                                    counted.fetch_add(1, Ordering::Relaxed);
                                    if to_database.write_all(&buffer[..read]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    let downstream = tokio::io::copy(&mut from_database, &mut to_service);
                    tokio::select! {
                        () = upstream => {}
                        _ = downstream => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                    // Both sockets drop here: the service sees its
                    // connection die, mid-statement or idle.
                });
            }
        });
        Self { port, up, sends }
    }

    /// How many times the service has sent something so far.
    pub fn sends(&self) -> u64 {
        self.sends.load(Ordering::Relaxed)
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}
