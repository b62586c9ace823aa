//! Guards `cairn-pool`, the command that formats, lists, changes and checks pool files: a
//! clean pool checks clean (exit 0), a damaged one is reported with the problem named (exit 1),
//! and bad input is refused with an error that says what was wrong.

use std::process::Command;

fn tool(path: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cairn-pool"))
        .arg(path)
        .args(args)
        .output()
        .expect("spawn cairn-pool")
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn create_change_list_and_check_a_pool_file() {
    let path = std::env::temp_dir().join(format!("cairn-pool-cli-{}.img", std::process::id()));
    ok(&tool(&path, &["create", "--size", "64M"]));
    ok(&tool(&path, &["volume-create", "pg", "16M"]));
    ok(&tool(&path, &["snapshot", "pg", "pg-snap"]));
    ok(&tool(&path, &["clone", "pg-snap", "pg-clone"]));
    ok(&tool(&path, &["grow", "pg", "32M"]));
    let ls = ok(&tool(&path, &["ls"]));
    for name in ["pg ", "pg-snap", "pg-clone"] {
        assert!(ls.contains(name), "ls lacks {name}: {ls}");
    }
    assert!(ls.contains("33554432"), "grown size missing: {ls}");
    let out = tool(&path, &["delete", "pg-snap"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pg-clone"),
        "refusal names the clone"
    );
    let check = ok(&tool(&path, &["check", "--json"]));
    let v: serde_json::Value = serde_json::from_str(check.trim()).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["volumes"], 2);
    assert_eq!(v["snapshots"], 1);

    // Damage the superblock: check exits 1... or refuses with the reason.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xFF; 4], 60).unwrap();
    let out = tool(&path, &["check"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_input_is_named() {
    let path = std::env::temp_dir().join(format!("cairn-pool-cli-bad-{}.img", std::process::id()));
    let out = tool(&path, &["create"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"));
    let out = tool(&path, &["create", "--size", "12Q"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("12Q"));
    ok(&tool(&path, &["create", "--size", "64M"]));
    let out = tool(&path, &["volume-create", "x", "4097"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of the block size"));
    let out = tool(&path, &["volume-create", "x", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("above zero"));
    std::fs::remove_file(&path).unwrap();
}

/// The checkpoint header bit flip (issue 16): one copy of the newest header with a flipped
/// magic is reported and exits 1, while the newest seq still wins; both copies flipped is a
/// rollback, reported with the seq it loses (`lost_seq` in the JSON) and exit 1. Before, the
/// pool fell back to the older checkpoint and check exited 0.
#[test]
fn check_reports_a_damaged_header_copy_and_a_rollback() {
    use cairn_engine::volume::format::Superblock;
    use std::os::unix::fs::FileExt;
    let path = std::env::temp_dir().join(format!("cairn-pool-flip-{}.img", std::process::id()));
    ok(&tool(&path, &["create", "--size", "64M"]));
    ok(&tool(&path, &["volume-create", "pg", "16M"]));
    let clean: serde_json::Value =
        serde_json::from_str(ok(&tool(&path, &["check", "--json"])).trim()).unwrap();
    let (seq, slot) = (
        clean["seq"].as_u64().unwrap(),
        clean["slot"].as_u64().unwrap(),
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    let sb = Superblock::decode(&sb).unwrap();
    let flip_magic = |at: u64| {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x04], at).unwrap();
    };
    let check = || {
        let out = tool(&path, &["check", "--json"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        v
    };
    let [first, second] = sb.header_offsets(slot as usize);
    flip_magic(first);
    let v = check();
    assert_eq!(
        (v["seq"].as_u64(), v["lost_seq"].as_u64()),
        (Some(seq), None),
        "{v}"
    );
    assert!(v["problems"].to_string().contains("bad magic"), "{v}");
    flip_magic(second);
    let v = check();
    assert_eq!(
        (v["seq"].as_u64(), v["lost_seq"].as_u64()),
        (Some(seq - 1), Some(seq)),
        "{v}"
    );
    assert!(v["problems"].to_string().contains("ROLLBACK"), "{v}");
    std::fs::remove_file(&path).unwrap();
}
