//! Change events beyond the database: waking the watchers of an
//! organization when its events commit (`hub`: one listening connection
//! serves every watcher, and watchers read the events themselves, by
//! sequence, from the pool), and publishing them to NATS JetStream (`relay`).

pub mod hub;
pub mod relay;
