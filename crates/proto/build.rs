//! Generates the gRPC stubs with a pure-Rust protobuf compiler, so the build needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cairn.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".cairn.v1.PutBlockChunk.data")
        .bytes(".cairn.v1.GetBlockChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
