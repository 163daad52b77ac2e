use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox compiles in-process, so neither developers, CI nor the image build
    // need a system `protoc`. google/api/*.proto (the google.api.http
    // annotations) are vendored under proto/.
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files([
            "channels/v1/channel_assignment.proto",
            "channels/v1/channel_inventory.proto",
        ])?;
    let file_descriptors = compiler.file_descriptor_set();

    // For reflection, with the options that `file_descriptor_set` drops
    // (prost does not keep extensions): the google.api.http rules stay in
    // what grpcurl describes and what a transcoder could be given.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("channels_v1_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
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
