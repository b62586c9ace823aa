//! Generates the cairn-node admin API client from the node's proto file (the one definition
//! of the API), with the protoc shipped inside the protoc-bin-vendored crate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "../node/proto/admin.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build runs the protoc named by PROTOC; a build script is single-threaded, so
    // setting the variable here races nothing.
    std::env::set_var("PROTOC", protoc);
    tonic_build::configure()
        .build_server(false)
        .build_client(true)
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&[PROTO], &["../node/proto"])?;
    Ok(())
}
