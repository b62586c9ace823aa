//! Guards the README's main command: `cairn-perf run` and `compare` work end to end on a small
//! generated file, print the documented JSON keys, run every round of a volume comparison on
//! one file, and refuse bad flags with a named error.

use std::process::Command;

fn perf() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairn-perf"))
}

fn temp_file(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cairn-perf-cli-{tag}-{}.img", std::process::id()))
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "cairn-perf failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone()).expect("utf-8 stdout");
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "exactly one JSON line: {stdout}"
    );
    serde_json::from_str(stdout.trim()).expect("stdout is one JSON object")
}

#[test]
fn run_prints_one_json_object_with_the_documented_keys() {
    let file = temp_file("run");
    for target in ["raw", "engine"] {
        let out = perf()
            .args([
                "run",
                "--target",
                target,
                "--size",
                "16M",
                "--runtime",
                "0.3",
            ])
            .args(["--rw", "randrw", "--qd", "4", "--json", "--file"])
            .arg(&file)
            .output()
            .expect("spawn cairn-perf");
        let v = json(&out);
        for key in ["iops", "mib_s", "cpu_s"] {
            assert!(v[key].as_f64().is_some(), "{target}: missing {key} in {v}");
        }
        assert!(v["iops"].as_f64().unwrap() > 0.0);
        for p in ["p50", "p99", "p999", "p9999"] {
            assert!(
                v["lat_us"][p].as_f64().is_some(),
                "{target}: missing lat_us.{p}"
            );
        }
    }
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        16 << 20,
        "file created at --size"
    );
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn compare_reports_ratios_and_every_round() {
    let file = temp_file("compare");
    let out = perf()
        .args([
            "compare",
            "--baseline",
            "raw",
            "--candidate",
            "engine",
            "--rounds",
            "2",
        ])
        .args([
            "--size",
            "16M",
            "--runtime",
            "0.3",
            "--rw",
            "randwrite",
            "--json",
            "--file",
        ])
        .arg(&file)
        .output()
        .expect("spawn cairn-perf");
    let v = json(&out);
    assert!(v["ratio_iops"].as_f64().unwrap() > 0.0);
    assert!(v["ratio_p99"].as_f64().unwrap() > 0.0);
    assert_eq!(v["baseline"].as_array().unwrap().len(), 2);
    assert_eq!(v["candidate"].as_array().unwrap().len(), 2);
    std::fs::remove_file(&file).unwrap();
}

/// The volume candidate reopens the file it locked in the round before: its pool, volume and
/// engine must have released it (round 2 failed with "exclusive lock held" once).
#[test]
fn compare_volume_runs_every_round_on_the_same_file() {
    let file = temp_file("compare-volume");
    let out = perf()
        .args(["compare", "--baseline", "raw", "--candidate", "volume"])
        .args(["--rounds", "2", "--size", "16M", "--runtime", "0.3"])
        .args(["--rw", "randread", "--json", "--file"])
        .arg(&file)
        .output()
        .expect("spawn cairn-perf");
    let v = json(&out);
    assert_eq!(v["candidate"].as_array().unwrap().len(), 2);
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn ram_bdevs_need_no_file() {
    for bdev in ["malloc", "null"] {
        let out = perf()
            .args(["run", "--target", "engine", "--bdev", bdev, "--size", "8M"])
            .args([
                "--runtime",
                "0.2",
                "--json",
                "--file",
                "/nonexistent/never-created",
            ])
            .output()
            .expect("spawn cairn-perf");
        assert!(json(&out)["iops"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bad_flags_are_named_in_the_error() {
    let cases: [(&[&str], &str); 4] = [
        (&["--bs", "100"], "--bs"),
        (&["--size", "4X"], "4X"),
        (&["--cores", "4096"], "--cores"),
        (&["--runtime", "0"], "--runtime"),
    ];
    for (args, needle) in cases {
        let out = perf()
            .args(["run", "--target", "engine", "--bdev", "null"])
            .args(args)
            .output()
            .expect("spawn cairn-perf");
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: error does not name {needle}: {err}"
        );
    }
}
