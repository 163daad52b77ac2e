//! Integration tests: the real server on a real socket, a real PostgreSQL
//! database per test, and the generated tonic clients.

mod assign;
mod auth;
mod binary;
mod concurrency;
mod deadlines;
mod docs;
mod events;
mod failover;
mod faults;
mod helpers;
mod hostile;
mod http;
mod http_client;
mod http_dev;
mod http_parity;
mod inventory;
mod isolation;
mod jwks;
mod load;
mod metrics;
mod migrations;
mod monitoring;
mod operations;
mod overload;
mod pool;
mod privileges;
mod proxy;
mod raw;
mod reads;
mod relay;
mod unassign;

/// Without PostgreSQL every `#[sqlx::test]` would wait 30 s for its pool and
/// fail with `PoolTimedOut`: look once, before any test runs, and stop at
/// once with the command that starts it.
// SAFETY: runs before main, touching only the environment, a socket and
// stderr, none of which needs the Rust runtime's initialisation.
#[ctor::ctor(unsafe)]
fn postgres_answers_or_stop() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let Ok(parsed) = url::Url::parse(&url) else {
        return;
    };
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = parsed.port().unwrap_or(5432);
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .into_iter()
        .flatten()
        .any(|address| {
            std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(2))
                .is_ok()
        });
    if !reachable {
        eprintln!(
            "\nThe tests need PostgreSQL on {host}:{port} (DATABASE_URL), and nothing answers there.\n\
             Start it with: pg_ctlcluster $(ls /etc/postgresql | sort -V | tail -n 1) main start\n\
             (or point DATABASE_URL at a running server; trust auth for the user postgres).\n"
        );
        std::process::exit(2);
    }
}
