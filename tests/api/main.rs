//! Integration tests: the real server on a real socket, a real PostgreSQL
//! database per test, and the generated tonic clients.

mod assign;
mod auth;
mod binary;
mod concurrency;
mod deadlines;
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
mod load;
mod metrics;
mod migrations;
mod operations;
mod overload;
mod pool;
mod proxy;
mod raw;
mod reads;
mod relay;
mod unassign;
