//! Guards cairn-node's NBD exports against the clients people actually use: qemu-img, qemu-io,
//! nbdinfo, nbdcopy, fio's nbd engine, and the kernel (ext4 on a loop device over nbdfuse).
//! Our own NBD client shares our reading of the protocol, so it cannot catch a server that is
//! wrong in the way the client is; these tools can. Each test checks the bytes it wrote come
//! back (patterns, checksums or byte comparison), that the advertised capabilities and block
//! sizes are what volumes promise, that `base:allocation` shows data exactly where it was
//! written, and that the daemon exits 0 on SIGTERM after serving.
//!
//! `CAIRN_NBD_TARGET=qemu-nbd|nbdkit` runs the same tests against those servers on a plain
//! file, which is how the tests themselves were checked. A missing tool skips a test with a
//! printed reason, and fails it under CI.

mod common;

use cairn_testkit::{require_root, require_tool};
use common::{
    assert_same_file, expected_map, parse_map, random_bytes, run_ok, ExportSpec, FuseGuard,
    LoopGuard, MountGuard, Server, KIB, MIB,
};

const VOL: &str = "vol";

fn volume_server(test: &str, size_bytes: u64) -> Server {
    Server::start(test, &[ExportSpec::volume(VOL, size_bytes)])
}

/// qemu-img reads the export size over both transports, and the malloc export's too.
#[test]
fn qemu_img_info_shows_the_virtual_size() {
    if !require_tool("qemu-img", "qemu-utils") {
        return;
    }
    let target = common::Target::from_env();
    let mut exports = vec![ExportSpec::volume(VOL, 96 * MIB + 64 * KIB)];
    if target == common::Target::Cairn {
        exports.push(ExportSpec::malloc("ram", 32 * MIB));
    }
    let s = Server::start("qemu_img_info", &exports);
    let mut uris = vec![(s.uri(VOL), exports[0].size_bytes())];
    if let Some(tcp) = s.tcp_uri(VOL) {
        uris.push((tcp, exports[0].size_bytes()));
    }
    if s.is_cairn() {
        uris.push((s.uri("ram"), 32 * MIB));
    }
    for (uri, size) in uris {
        let json = s.ok("qemu-img", &["info", "--output=json", &uri]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("qemu-img json");
        assert_eq!(v["virtual-size"], size, "qemu-img info {uri}: {json}");
    }
    // An export that does not exist is refused, not served as something else.
    let out = s.output("qemu-img", &["info", &s.uri("no-such-export")]);
    if s.is_cairn() {
        assert!(
            !out.status.success(),
            "qemu-img info of a missing export succeeded"
        );
    }
    s.stop_clean();
}

/// A random file with zero runs goes through qemu-img convert into the export and back out
/// unchanged. The zero runs make qemu-img send WRITE_ZEROES and read back holes.
#[test]
fn qemu_img_convert_round_trip() {
    if !require_tool("qemu-img", "qemu-utils") {
        return;
    }
    let size = 48 * MIB;
    let s = volume_server("qemu_img_convert", size);
    let src = s.dir.join("src.bin");
    let back = s.dir.join("back.bin");
    let mut data = random_bytes(size, 1);
    data[(5 * MIB) as usize..(8 * MIB) as usize].fill(0); // whole clusters
    data[(20 * MIB + 4096) as usize..(20 * MIB + 3 * 4096) as usize].fill(0); // part of one
    data[(size - MIB) as usize..].fill(0); // the tail
    std::fs::write(&src, &data).unwrap();
    let uri = s.uri(VOL);
    let src_s = src.to_str().unwrap();
    s.ok(
        "qemu-img",
        &["convert", "-p", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    s.ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            back.to_str().unwrap(),
        ],
    );
    assert_same_file(&src, &back);
    // qemu-img compare reads both through its own block layer: a second, independent check.
    s.ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    s.stop_clean();
}

/// Regions that start and end off 4 KiB boundaries, cross cluster boundaries, or are large.
/// (offset, length, pattern byte); no two overlap.
fn pattern_regions(size: u64) -> Vec<(u64, u64, u8)> {
    vec![
        (0, 4096, 0x11),
        (4096 * 3 + 512, 1000, 0x22),
        (MIB - 100, 200, 0x33),
        (2 * MIB + 1, 8 * MIB, 0x44),
        (11 * MIB - 4096, 4096 * 2, 0x55),
        (13 * MIB + 777, 64 * KIB + 3, 0x66),
        (16 * MIB, 1, 0x77),
        (size - 1000, 1000, 0x88),
    ]
}

fn qemu_io_args(uri: &str, cmds: &[String]) -> Vec<String> {
    let mut a = vec!["-f".to_string(), "raw".into(), uri.into()];
    for c in cmds {
        a.push("-c".into());
        a.push(c.clone());
    }
    a
}

fn qemu_io(s: &Server, uri: &str, cmds: &[String]) -> String {
    let a = qemu_io_args(uri, cmds);
    let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
    s.ok("qemu-io", &a)
}

/// Writes patterns with qemu-io (plain, FUA, zeroes, discard) and reads them back on the same
/// connection and on a second one; data next to an unaligned discard or zero write survives.
#[test]
fn qemu_io_patterns_at_unaligned_and_large_offsets() {
    if !require_tool("qemu-io", "qemu-utils") {
        return;
    }
    let size = 32 * MIB;
    let s = volume_server("qemu_io_patterns", size);
    let uri = s.uri(VOL);
    let regions = pattern_regions(size);
    let mut w: Vec<String> = regions
        .iter()
        .enumerate()
        .map(|(i, (o, l, p))| {
            // Every other write asks for FUA (qemu-io -f).
            let fua = if i % 2 == 1 { "-f " } else { "" };
            format!("write {fua}-P 0x{p:02x} {o} {l}")
        })
        .collect();
    w.push("flush".into());
    let reads: Vec<String> = regions
        .iter()
        .map(|(o, l, p)| format!("read -P 0x{p:02x} {o} {l}"))
        .collect();
    w.extend(reads.iter().cloned());
    qemu_io(&s, &uri, &w);
    qemu_io(&s, &uri, &reads); // a second connection sees the same data

    // Never-written space reads as zero.
    qemu_io(&s, &uri, &[format!("read -P 0 {} {}", 20 * MIB, 2 * MIB)]);

    // Zero part of the large region with an unaligned WRITE_ZEROES, with and without
    // permission to unmap, and discard a part that is 4 KiB aligned (qemu refuses to send
    // a discard below the advertised minimum block size) but not cluster aligned and
    // spanning a cluster boundary: neighbours must be intact.
    let (big_o, big_l) = (2 * MIB + 1, 8 * MIB);
    let z1 = (big_o + 10_000, 3 * MIB);
    let z2 = (big_o + 4 * MIB, 123_457);
    let trim = (8 * MIB + 12_288, MIB + 8192);
    qemu_io(
        &s,
        &uri,
        &[
            format!("write -z {} {}", z1.0, z1.1),
            format!("write -z -u {} {}", z2.0, z2.1),
            format!("discard {} {}", trim.0, trim.1),
            "flush".into(),
        ],
    );
    let end = big_o + big_l;
    qemu_io(
        &s,
        &uri,
        &[
            format!("read -P 0x44 {big_o} {}", z1.0 - big_o),
            format!("read -P 0 {} {}", z1.0, z1.1),
            format!("read -P 0x44 {} {}", z1.0 + z1.1, z2.0 - (z1.0 + z1.1)),
            format!("read -P 0 {} {}", z2.0, z2.1),
            format!("read -P 0x44 {} {}", z2.0 + z2.1, trim.0 - (z2.0 + z2.1)),
            format!(
                "read -P 0x44 {} {}",
                trim.0 + trim.1,
                end - (trim.0 + trim.1)
            ),
            // The other regions are untouched.
            format!("read -P 0x33 {} 200", MIB - 100),
            format!("read -P 0x55 {} {}", 11 * MIB - 4096, 8192),
        ],
    );
    s.stop_clean();
}

/// nbdinfo sees every capability a volume promises, and the block sizes it advertises.
#[test]
fn nbdinfo_reports_capabilities_and_block_size() {
    if !require_tool("nbdinfo", "libnbd-bin") {
        return;
    }
    let s = volume_server("nbdinfo_can", 16 * MIB);
    let uri = s.uri(VOL);
    for cap in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "multi-conn",
        "structured-reply",
    ] {
        let out = s.output("nbdinfo", &["--can", cap, &uri]);
        assert!(
            out.status.success(),
            "nbdinfo --can {cap} {uri}: exit {} (2 means the server says no) {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            s.log_tail()
        );
    }
    let json = s.ok("nbdinfo", &["--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo json");
    let e = &v["exports"][0];
    let contexts = e["contexts"].as_array().expect("contexts");
    assert!(
        contexts.iter().any(|c| c == "base:allocation"),
        "no base:allocation: {json}"
    );
    assert_eq!(e["export-size"], 16 * MIB, "{json}");
    assert_eq!(e["is_read_only"], false, "{json}");
    if s.is_cairn() {
        assert_eq!(
            e["block_size_minimum"], 4096,
            "volume min block size: {json}"
        );
        let pref = e["block_size_preferred"]
            .as_u64()
            .expect("preferred block size");
        let max = e["block_size_maximum"]
            .as_u64()
            .expect("maximum block size");
        assert!(
            pref >= 4096 && pref.is_power_of_two(),
            "preferred {pref}: {json}"
        );
        assert!(max >= pref, "maximum {max} below preferred {pref}: {json}");
    }
    // The export list names the volume.
    let list = s.ok("nbdinfo", &["--list", "--json", &uri]);
    assert!(
        list.contains(&format!("\"export-name\": \"{VOL}\"")) || !s.is_cairn(),
        "{list}"
    );
    s.stop_clean();
}

/// After writes to a few regions of a fresh thin volume, `nbdinfo --map` shows data in
/// exactly the clusters written and hole,zero everywhere else.
#[test]
fn nbdinfo_map_shows_data_exactly_where_written() {
    if !require_tool("nbdinfo", "libnbd-bin") || !require_tool("qemu-io", "qemu-utils") {
        return;
    }
    let size = 40 * MIB;
    let s = volume_server("nbdinfo_map", size);
    let uri = s.uri(VOL);
    let g = s.target.allocation_granularity_bytes();
    let fresh = parse_map(&s.ok("nbdinfo", &["--map", &uri]));
    assert_eq!(fresh, expected_map(size, g, &[]), "fresh volume map");

    let writes = [
        (0, 4096),
        (3 * MIB + 5000, 10_000),
        (10 * MIB - 100, 200), // crosses a cluster boundary
        (20 * MIB, 2 * MIB + 4096),
        (size - 4096, 4096),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -P 0x5a {o} {l}"))
        .collect();
    qemu_io(&s, &uri, &cmds);
    let got = parse_map(&s.ok("nbdinfo", &["--map", &uri]));
    let want = expected_map(size, g, &writes);
    assert_eq!(got, want, "map after writes {writes:?}\n{}", s.log_tail());
    s.stop_clean();
}

/// nbdcopy (multi-conn, parallel requests) into the export and back out, byte for byte.
#[test]
fn nbdcopy_to_and_from_a_file() {
    if !require_tool("nbdcopy", "libnbd-bin") {
        return;
    }
    let size = 64 * MIB;
    let s = volume_server("nbdcopy", size);
    let uri = s.uri(VOL);
    let src = s.dir.join("src.bin");
    let back = s.dir.join("back.bin");
    let mut data = random_bytes(size, 2);
    data[(30 * MIB) as usize..(33 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    s.ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]);
    s.ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert_same_file(&src, &back);
    // Again with one connection and small requests, so requests straddle clusters.
    let back1 = s.dir.join("back1.bin");
    s.ok(
        "nbdcopy",
        &[
            "--connections=1",
            "--request-size=65536",
            &uri,
            back1.to_str().unwrap(),
        ],
    );
    assert_same_file(&src, &back1);
    s.stop_clean();
}

fn fio(s: &Server, uri: &str, name: &str, extra: &[&str]) -> String {
    let mut a = vec![
        format!("--name={name}"),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--bs=4k".into(),
        "--iodepth=32".into(),
        "--output-format=terse".into(),
        // fio otherwise drops <job>-verify.state files into its working directory, the
        // source tree under cargo test.
        "--verify_state_save=0".into(),
    ];
    a.extend(extra.iter().map(|x| x.to_string()));
    let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
    s.ok("fio", &a)
}

/// fio random writes with crc32c verification, a separate verify-only pass on a new
/// connection, and a verified random read/write mix.
#[test]
fn fio_randwrite_verify_and_randrw() {
    if !require_tool("fio", "fio") {
        return;
    }
    let size = 64 * MIB;
    let s = volume_server("fio", size);
    let uri = s.uri(VOL);
    let common = [
        "--verify=crc32c",
        "--randrepeat=1",
        "--size=48M",
        "--verify_fatal=1",
    ];
    let mut w = vec!["--rw=randwrite", "--do_verify=1"];
    w.extend(common);
    fio(&s, &uri, "randwrite-verify", &w);
    let mut v = vec!["--rw=randwrite", "--verify_only=1"];
    v.extend(common);
    fio(&s, &uri, "randwrite-verify", &v);
    // A mix: 70 % reads, writes verified, in the other part of the volume.
    fio(
        &s,
        &uri,
        "randrw",
        &[
            "--rw=randrw",
            "--rwmixread=70",
            "--offset=48M",
            "--size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--io_size=64M",
        ],
    );
    s.stop_clean();
}

/// Several clients at once on different regions: four qemu-io writers, then four fio
/// verifying jobs (one connection each), each region checked from a fresh connection.
#[test]
fn several_clients_at_once() {
    if !require_tool("qemu-io", "qemu-utils") || !require_tool("fio", "fio") {
        return;
    }
    let region = 8 * MIB;
    let size = 8 * region;
    let s = volume_server("several_clients", size);
    let uri = s.uri(VOL);
    let writers: Vec<_> = (0..4u64)
        .map(|i| {
            let base = i * region;
            // 64 KiB writes offset by 512 bytes, so neighbouring writes share 4 KiB blocks
            // within one client's region.
            let cmds: Vec<String> = vec![
                format!(
                    "write -P 0x{:02x} {} {}",
                    0xa0 + i,
                    base + 512,
                    region - 1024
                ),
                format!(
                    "aio_write -P 0x{:02x} {} 65536",
                    0xb0 + i,
                    base + 3 * MIB + 512
                ),
                format!(
                    "aio_write -P 0x{:02x} {} 65536",
                    0xc0 + i,
                    base + 5 * MIB + 4095
                ),
                "aio_flush".into(),
            ];
            let a = qemu_io_args(&uri, &cmds);
            let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
            s.spawn("qemu-io", &a)
        })
        .collect();
    // fio jobs run at the same time on the upper half, one connection each.
    let fio_bg = {
        let a = [
            "--name=multi".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=16".into(),
            "--numjobs=4".into(),
            format!("--offset={}", 4 * region),
            format!("--offset_increment={region}"),
            format!("--size={region}"),
            "--verify=crc32c".into(),
            "--verify_fatal=1".into(),
            "--verify_state_save=0".into(),
            "--output-format=terse".into(),
        ];
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        s.spawn("fio", &a)
    };
    for w in writers {
        s.wait_ok(w);
    }
    s.wait_ok(fio_bg);
    let mut checks = Vec::new();
    for i in 0..4u64 {
        let base = i * region;
        let a = 0xa0 + i;
        let (b_off, c_off) = (base + 3 * MIB + 512, base + 5 * MIB + 4095);
        checks.push(format!(
            "read -P 0x{a:02x} {} {}",
            base + 512,
            b_off - (base + 512)
        ));
        checks.push(format!("read -P 0x{:02x} {b_off} 65536", 0xb0 + i));
        checks.push(format!(
            "read -P 0x{a:02x} {} {}",
            b_off + 65536,
            c_off - (b_off + 65536)
        ));
        checks.push(format!("read -P 0x{:02x} {c_off} 65536", 0xc0 + i));
        let end = base + region - 512;
        checks.push(format!(
            "read -P 0x{a:02x} {} {}",
            c_off + 65536,
            end - (c_off + 65536)
        ));
        checks.push(format!("read -P 0 {base} 512"));
    }
    qemu_io(&s, &uri, &checks);
    s.stop_clean();
}

/// A loop device with 4 KiB sectors over the nbdfuse file. nbdfuse passes each request
/// straight to libnbd, which refuses requests below the export's minimum block size (4 KiB for
/// volumes) instead of doing read-modify-write; a 512-byte-sector loop device makes ext4 write
/// its 1 KiB superblock at offset 1024, which fails with "request is unaligned".
fn attach_loop(fuse: &FuseGuard) -> LoopGuard {
    let file = fuse.file();
    let dev = run_ok(
        "losetup",
        &["-f", "--show", "-b", "4096", file.to_str().unwrap()],
    );
    LoopGuard(dev.trim().to_string())
}

/// The kernel as a client: ext4 made on a loop device over nbdfuse, files written, unmounted,
/// mounted again (page cache gone with the loop device) and read back, then fsck clean.
#[test]
fn ext4_on_nbdfuse_survives_remount() {
    let tools = [
        ("nbdfuse", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("e2fsck", "e2fsprogs"),
    ];
    if !require_root("losetup and mount")
        || !tools.iter().all(|&(tool, pkg)| require_tool(tool, pkg))
        || !cairn_testkit::require(
            std::path::Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing (ci/test.sh makes it when root)",
        )
    {
        return;
    }
    let s = volume_server("ext4_on_nbdfuse", 128 * MIB);
    let uri = s.uri(VOL);
    let fuse_dir = s.dir.join("fuse");
    let mnt = s.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..8u64)
        .map(|i| {
            (
                format!("f{i}.bin"),
                random_bytes(MIB * (i + 1) / 2 + i * 777, 100 + i),
            )
        })
        .collect();
    {
        // Drop order (reverse of declaration) unmounts, then detaches, then unmounts fuse.
        let fuse = FuseGuard::start(&fuse_dir, &uri, &s.dir.join("nbdfuse.log"));
        let lo = attach_loop(&fuse);
        run_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", &lo.0]);
        let m = mnt.to_str().unwrap();
        {
            run_ok("mount", &[&lo.0, m]);
            let _mount = MountGuard(mnt.clone());
            for (name, data) in &files {
                std::fs::write(mnt.join(name), data).unwrap();
            }
            run_ok("sync", &[]);
        }
        {
            run_ok("mount", &[&lo.0, m]);
            let _mount = MountGuard(mnt.clone());
            for (name, data) in &files {
                let got = std::fs::read(mnt.join(name)).unwrap();
                assert!(got == *data, "{name} differs after remount");
            }
        }
        run_ok("e2fsck", &["-f", "-n", &lo.0]);
    }
    // And through a new nbdfuse, loop device and mount: nothing was only in a cache.
    {
        let fuse = FuseGuard::start(&fuse_dir, &uri, &s.dir.join("nbdfuse2.log"));
        let lo = attach_loop(&fuse);
        run_ok("mount", &["-o", "ro", &lo.0, mnt.to_str().unwrap()]);
        let _mount = MountGuard(mnt.clone());
        for (name, data) in &files {
            let got = std::fs::read(mnt.join(name)).unwrap();
            assert!(got == *data, "{name} differs on a new connection");
        }
    }
    s.stop_clean();
}

/// A RAM export serves the same patterns and a byte-exact nbdcopy round trip (cairn-node only).
#[test]
fn malloc_export_round_trip() {
    if common::Target::from_env() != common::Target::Cairn {
        cairn_testkit::skip("--malloc is cairn-node's");
        return;
    }
    if !require_tool("qemu-io", "qemu-utils")
        || !require_tool("nbdcopy", "libnbd-bin")
        || !require_tool("nbdinfo", "libnbd-bin")
    {
        return;
    }
    let size = 32 * MIB;
    let s = Server::start("malloc_export", &[ExportSpec::malloc("ram", size)]);
    let uri = s.uri("ram");
    let json = s.ok("nbdinfo", &["--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo json");
    let min = v["exports"][0]["block_size_minimum"].as_u64().unwrap_or(1);
    assert!(
        min.is_power_of_two() && min <= 4096,
        "malloc min block size {min}: {json}"
    );
    let regions = pattern_regions(size);
    let mut cmds: Vec<String> = regions
        .iter()
        .map(|(o, l, p)| format!("write -P 0x{p:02x} {o} {l}"))
        .collect();
    cmds.extend(
        regions
            .iter()
            .map(|(o, l, p)| format!("read -P 0x{p:02x} {o} {l}")),
    );
    qemu_io(&s, &uri, &cmds);
    let src = s.dir.join("src.bin");
    let back = s.dir.join("back.bin");
    std::fs::write(&src, random_bytes(size, 3)).unwrap();
    s.ok("nbdcopy", &[src.to_str().unwrap(), &uri]);
    s.ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert_same_file(&src, &back);
    s.stop_clean();
}

/// A client killed in the middle of queued writes (fio at QD 32, SIGKILL) leaves the daemon
/// serving: a new client writes and reads back elsewhere, and SIGTERM still drains and exits 0.
#[test]
fn client_killed_mid_io_leaves_the_server_serving() {
    if !require_tool("fio", "fio") || !require_tool("qemu-io", "qemu-utils") {
        return;
    }
    let s = volume_server("client_killed", 64 * MIB);
    let uri = s.uri(VOL);
    for round in 0..3 {
        let a = [
            format!("--name=killed-{round}"),
            // Threads, not fio's default forked job process, which sits in its own process
            // group and would outlive the kill and go on writing.
            "--thread".into(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=64k".into(),
            "--iodepth=32".into(),
            "--time_based".into(),
            "--runtime=60".into(),
            "--size=32M".into(),
        ];
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        let bg = s.spawn("fio", &a);
        // No timing claim: however far fio got, killing it must not hurt the server.
        std::thread::sleep(std::time::Duration::from_millis(500 + 500 * round));
        drop(bg); // SIGKILL
    }
    qemu_io(
        &s,
        &uri,
        // Outside the killed clients' 32 MiB: writes they had sent but never saw acknowledged
        // may still land (NBD orders nothing across a dead connection), so this asserts only
        // that the server serves, not what became of theirs.
        &["write -P 0x3c 40M 1M".into(), "read -P 0x3c 40M 1M".into()],
    );
    s.stop_clean();
}
