//! channel-assignment: links mailboxes and phone numbers to AI-agent
//! identities, over gRPC, in front of PostgreSQL.

pub mod auth;
pub mod config;
pub mod dev;
pub mod domain;
pub mod error;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("channels.v1");

    /// The encoded descriptors of `channels.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/channels_v1_descriptor.bin"));
}

/// The schema's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
