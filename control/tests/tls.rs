//! Guards mutual TLS on the control process and `cairnctl cert`: `cert init` and `cert issue`
//! make a CA and certificates that load and name their identities (and refuse to overwrite
//! either); a REST API run with `--tls-*` refuses, in the handshake, a client without a
//! certificate and one whose certificate is another CA's, and answers plain HTTP with nothing;
//! an admin identity may call everything, and the log names it; a node identity may heartbeat
//! only itself and read the leader, and anything else is a 403 naming it; and a listener
//! beyond loopback without TLS is refused at start unless `--insecure`.

mod common;

use cairn_control_api::client::Client;
use cairn_tls::{Identity, Tls, TlsFiles};
use common::{free_port, test_dir, wait_for, START_TIMEOUT};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

fn cairnctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn load(dir: &Path) -> Tls {
    Tls::load(&TlsFiles::in_dir(dir)).unwrap()
}

#[test]
fn cert_init_and_issue_round_trip() {
    let top = test_dir("cert");
    let ca = top.join("ca");
    let ca_s = ca.to_str().unwrap();
    let out = cairnctl(&["cert", "init", ca_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = cairnctl(&["cert", "init", ca_s]);
    assert!(!again.status.success() && stderr(&again).contains("already holds a CA"));
    let issued = [
        (
            vec!["--node", "n1", "--addr", "127.0.0.1", "10.0.0.5"],
            "node-n1",
            Identity::Node("n1".into()),
        ),
        (
            vec![
                "--control",
                "c1",
                "--addr",
                "127.0.0.1",
                "--dns",
                "cairn-control",
            ],
            "control-c1",
            Identity::Control("c1".into()),
        ),
        (
            vec!["--admin", "ops"],
            "admin-ops",
            Identity::Admin("ops".into()),
        ),
    ];
    for (flags, dir, identity) in &issued {
        let mut args = vec!["cert", "issue", ca_s];
        args.extend(flags);
        let out = cairnctl(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("issued {identity}")), "{stdout}");
        assert_eq!(load(&ca.join(dir)).identity(), identity);
    }
    let twice = cairnctl(&["cert", "issue", ca_s, "--node", "n1"]);
    assert!(!twice.status.success(), "issued n1 twice");
    let nobody = cairnctl(&["cert", "issue", ca_s]);
    assert!(
        !nobody.status.success() && stderr(&nobody).contains("--node"),
        "{}",
        stderr(&nobody)
    );
}

/// A client configuration that presents no certificate.
#[allow(deprecated)]
fn anonymous(roots: Arc<rustls::RootCertStore>) -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

#[test]
fn rest_over_mutual_tls_admits_by_identity() {
    let top = test_dir("rest-tls");
    let ca = top.join("ca");
    cairn_tls::issue::init_ca(&ca).unwrap();
    let ip = ["127.0.0.1".parse().unwrap()];
    let issue = |ca: &Path, id: Identity| cairn_tls::issue::issue(ca, &id, &ip, &[]).unwrap();
    let control_dir = issue(&ca, Identity::Control("c1".into()));
    let admin = load(&issue(&ca, Identity::Admin("ops".into())));
    let node = load(&issue(&ca, Identity::Node("n1".into())));
    let other = top.join("other-ca");
    cairn_tls::issue::init_ca(&other).unwrap();
    let stranger = load(&issue(&other, Identity::Admin("ops".into())));

    let port = free_port();
    let files = TlsFiles::in_dir(&control_dir);
    let log = top.join("control.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-control"))
        .arg("--data-dir")
        .arg(top.join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-ca")
        .arg(&files.ca)
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let client = |tls: &Tls| {
        Client::new(&url, HTTP_TIMEOUT)
            .unwrap()
            .with_tls(Some(tls.client_config()))
            .unwrap()
    };
    let ops = client(&admin);
    wait_for("the REST API over TLS", START_TIMEOUT, || {
        ops.get("/v1/nodes").ok().filter(|r| r.status == 200)
    });

    // Refused in the handshake: no certificate, another CA's; plain HTTP gets no answer.
    let bare = Client::new(&url, HTTP_TIMEOUT)
        .unwrap()
        .with_tls(Some(anonymous(admin.client_config_roots())))
        .unwrap();
    assert!(
        bare.get("/v1/nodes").is_err(),
        "a client without a certificate got in"
    );
    assert!(
        client(&stranger).get("/v1/nodes").is_err(),
        "another CA's certificate got in"
    );
    let plain = Client::new(&format!("http://127.0.0.1:{port}"), HTTP_TIMEOUT).unwrap();
    assert!(plain.get("/v1/nodes").map_or(true, |r| r.status != 200));

    // An admin may mutate (here a malformed create: 400 from the handler, past the check).
    let r = ops.post_json("/v1/volumes", b"{}").unwrap();
    assert_eq!(r.status, 400, "{}", r.error_message());

    // A node: its own heartbeat and the leader, nothing else.
    let n1 = client(&node);
    assert_eq!(n1.get("/v1/leader").unwrap().status, 200);
    let r = n1.get("/v1/volumes").unwrap();
    assert_eq!(r.status, 403);
    assert!(
        r.error_message()
            .contains("node:n1 may not GET /v1/volumes"),
        "{}",
        r.error_message()
    );
    let r = n1.post_json("/v1/nodes/n2/heartbeat", b"{}").unwrap();
    assert_eq!(r.status, 403, "{}", r.error_message());
    let r = n1.post_json("/v1/nodes/n1/heartbeat", b"{}").unwrap();
    assert_ne!(r.status, 403, "{}", r.error_message());
    // In-sync reports only from a volume's attach node, for itself: n1 is attached nowhere.
    let report = |node: &str| {
        serde_json::json!({"node": node, "epoch": 7, "generation": 3,
                           "replicas": [{"address": "local", "state": "in_sync"}]})
        .to_string()
    };
    for who in ["n1", "n2"] {
        let r = n1
            .post_json("/v1/volumes/v/insync", report(who).as_bytes())
            .unwrap();
        assert_eq!(r.status, 403, "{}", r.error_message());
        assert!(
            r.error_message().contains("only its attach node"),
            "{}",
            r.error_message()
        );
    }

    drop(child.kill());
    drop(child.wait());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("peer=admin:ops") && log.contains("/v1/volumes"),
        "{log}"
    );
    assert!(
        log.contains("peer=node:n1") && log.contains("REST request refused"),
        "{log}"
    );
}

#[test]
fn a_rest_listener_beyond_loopback_needs_tls_or_insecure() {
    let top = test_dir("insecure");
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-control"))
        .arg("--data-dir")
        .arg(top.join("data"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--listen 0.0.0.0:0 listens beyond this machine without TLS")
            && err.contains("--insecure"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-control"))
        .arg("--data-dir")
        .arg(top.join("data"))
        .args(["--listen", "127.0.0.1:0", "--tls-ca", "x.pem"])
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("--tls-cert and --tls-key missing"),
        "{}",
        stderr(&out)
    );
}
