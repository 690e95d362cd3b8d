//! Compiles `proto/` with protox, a pure-Rust protobuf compiler, so building
//! needs no system `protoc`.

use std::path::PathBuf;

const PROTO_ROOT: &str = "../../proto";
const FILES: &[&str] = &[
    "k8shell/provisioner/v1/provisioner.proto",
    "k8shell/k8shelld/v1/k8shelld.proto",
    "k8shell/identity/v1/identity.proto",
    "k8shell/authz/v1/authz.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let files: Vec<PathBuf> = FILES.iter().map(PathBuf::from).collect();
    let descriptors = protox::compile(&files, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set; reflection needs it.
    std::fs::write(
        out_dir.join("k8shell_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Messages k8shelld's local REST API returns as JSON too.
    let mut builder = tonic_prost_build::configure();
    for message in [
        "App",
        "ListeningPort",
        "Mount",
        "SystemInfo",
        "InitScriptStatus",
    ] {
        builder = builder.type_attribute(
            format!(".k8shell.k8shelld.v1.{message}"),
            "#[derive(serde::Serialize)]",
        );
    }
    builder.compile_fds(descriptors)?;

    Ok(())
}
