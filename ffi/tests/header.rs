//! Guards the committed C header against drift: `ffi/include/cairn.h` must be exactly what
//! cbindgen generates from the crate today, so the header can never be edited by hand or fall
//! behind the code. Set `CAIRN_BLESS_HEADER=1` to rewrite it after an intended API change.

use std::path::PathBuf;

#[test]
fn committed_header_matches_cbindgen() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("header is UTF-8");
    let path = dir.join("include/cairn.h");
    if std::env::var_os("CAIRN_BLESS_HEADER").is_some() {
        std::fs::write(&path, &fresh).expect("write header");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} differs from the cbindgen output; rerun with CAIRN_BLESS_HEADER=1 and commit it",
        path.display()
    );
}
