//! Generates the CSI services (server and client) from proto/csi.proto with the protoc that
//! ships inside the protoc-bin-vendored crate (and its well-known types), so no system protoc
//! is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // prost-build runs the protoc named by PROTOC; a build script is single-threaded, so
    // setting the variable here races nothing.
    std::env::set_var("PROTOC", protoc);
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &["proto/csi.proto"],
            &[std::path::Path::new("proto"), &well_known],
        )?;
    Ok(())
}
