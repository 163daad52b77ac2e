use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox compiles in-process, so neither developers, CI nor the image build
    // need a system `protoc`.
    let file_descriptors = protox::compile(
        [
            "channels/v1/channel_assignment.proto",
            "channels/v1/channel_inventory.proto",
        ],
        ["proto"],
    )?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("channels_v1_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        // prost's codec, with the contract's error for undecodable messages.
        .codec_path("crate::api::grpc::codec::ContractCodec")
        // Identity details carry e-mail addresses and phone numbers: keep them
        // out of logs that print a request or response with `{:?}`.
        .skip_debug([
            ".channels.v1.Identity",
            ".channels.v1.Mailbox",
            ".channels.v1.PhoneNumber",
            ".channels.v1.LookupIdentityRequest",
            ".channels.v1.UpsertIdentityRequest",
            ".channels.v1.UpsertMailboxRequest",
            ".channels.v1.UpsertPhoneNumberRequest",
        ])
        .compile_fds(file_descriptors)?;

    // compile_fds does not emit rerun lines of its own.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
