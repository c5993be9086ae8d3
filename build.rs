//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates the tonic
//! server and client, plus the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/wasmcache/v1/wasmcache.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("wasmcache_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // A request that does not decode is INVALID_ARGUMENT (prost's codec says INTERNAL).
        .codec_path("crate::api::codec::StrictCodec")
        // Module chunks are slices of the mapped blob file, not copies.
        .bytes(".wasmcache.v1.ModuleChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
