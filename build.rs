//! Generates the gRPC code and the descriptor set (for server reflection)
//! from `proto/`. Uses the `protoc` shipped by `protoc-bin-vendored`, so no
//! protoc needs to be installed; set `PROTOC` to use another one.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if env::var_os("PROTOC").is_none() {
        // SAFETY of intent: build scripts are single-threaded here.
        unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    // The tests that generate other languages' stubs from proto/ use the
    // same protoc (tests/it/proto.rs).
    if let Some(protoc) = env::var_os("PROTOC") {
        println!(
            "cargo:rustc-env=AGENT_LIFECYCLE_PROTOC={}",
            protoc.to_string_lossy()
        );
    }
    let include = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // Smaller per-call buffers than tonic's default (src/api/grpc/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::api::grpc::codec::LeanCodec")
        .file_descriptor_set_path(out_dir.join("agentlifecycle_descriptor.bin"))
        .compile_protos(
            &[PathBuf::from("proto/agentlifecycle/v1/lifecycle.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    Ok(())
}
