//! Guards the REST API's edges against a running cairn-control: every route in
//! `rest::ROUTES` (the list the OpenAPI test compares with openapi.json) is really served, the
//! OpenAPI document is served, and malformed input (bad JSON, wrong types, unknown fields, bad
//! ids and addresses, oversized bodies, unknown routes and methods) gets a 4xx with a JSON error
//! naming the problem, changes nothing, and leaves the process serving.

mod common;

use cairn_control::rest::ROUTES;
use cairn_control_api::ErrorBody;
use common::{test_dir, Control};

fn error_of(r: &cairn_control_api::client::Response) -> String {
    serde_json::from_slice::<ErrorBody>(&r.body)
        .unwrap_or_else(|_| panic!("not a JSON error: {}", String::from_utf8_lossy(&r.body)))
        .error
}

#[test]
fn every_documented_route_is_served() {
    let dir = test_dir("rest-routes");
    let control = Control::start(&dir, None, 0);
    for (method, path) in ROUTES {
        let path = path.replace("{id}", "someone").replace("{name}", "vol");
        let method = match *method {
            "get" => "GET",
            "delete" => "DELETE",
            _ => "POST",
        };
        let r = control.client.request(method, &path, Some(b"{}")).unwrap();
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            r.status != 405 && !body.contains("no route"),
            "{method} {path}: {} {body}",
            r.status
        );
    }
    let doc = control.get("/openapi.json");
    assert!(doc["paths"]["/v1/nodes"]["get"].is_object());
}

#[test]
fn malformed_requests_get_a_json_400_and_change_nothing() {
    let dir = test_dir("rest-bad");
    let control = Control::start(&dir, None, 0);
    let good = r#"{"addresses":{"admin":"127.0.0.1:7000"},"zone":"z","rack":"r"}"#;
    let report = r#"{"node":"a","epoch":1,"generation":1,"replicas":[{"address":"local","state":"in_sync"}]}"#;
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/nodes/a/register", "{", 400, "not valid JSON"),
        ("/v1/nodes/a/register", "[]", 400, "not valid JSON"),
        (
            "/v1/nodes/a/register",
            r#"{"addresses":{"admin":7},"zone":"z","rack":"r"}"#,
            400,
            "invalid type",
        ),
        (
            "/v1/nodes/a/register",
            r#"{"addresses":{"admin":"x:y"},"zone":"z","rack":"r"}"#,
            400,
            "admin address 'x:y'",
        ),
        (
            "/v1/nodes/a/register",
            r#"{"addresses":{"admin":"127.0.0.1:1"},"zone":"","rack":"r"}"#,
            400,
            "zone '' is invalid",
        ),
        (
            "/v1/nodes/a/register",
            r#"{"addresses":{"admin":"127.0.0.1:1"},"zone":"z","rack":"r","x":1}"#,
            400,
            "unknown field `x`",
        ),
        ("/v1/nodes/bad!id/register", good, 400, "node id 'bad!id'"),
        (
            "/v1/volumes",
            "{",
            400,
            "not valid JSON for a volume creation",
        ),
        (
            "/v1/volumes",
            r#"{"name":"v","size_bytes":4096,"replicas":9}"#,
            400,
            "replica count '9'",
        ),
        (
            "/v1/volumes/bad!name/attach",
            "{}",
            400,
            "volume name 'bad!name'",
        ),
        (
            "/v1/volumes/v/grow",
            r#"{"size_bytes":1}"#,
            400,
            "below the block size",
        ),
        ("/v1/volumes/v/snapshot", "{}", 400, "missing field `name`"),
        (
            "/v1/nodes/a/heartbeat",
            "{}",
            400,
            "missing field `incarnation`",
        ),
        (
            "/v1/nodes/a/heartbeat",
            r#"{"incarnation":-1}"#,
            400,
            "invalid value",
        ),
        (
            "/v1/nodes/nobody/heartbeat",
            r#"{"incarnation":1}"#,
            404,
            "node 'nobody' is not registered",
        ),
        ("/v1/volumes/v/insync", "{", 400, "not valid JSON"),
        (
            "/v1/volumes/bad!v/insync",
            report,
            400,
            "volume name 'bad!v'",
        ),
        (
            "/v1/volumes/v/insync",
            r#"{"node":"a","epoch":0,"generation":1,"replicas":[{"address":"local","state":"in_sync"}]}"#,
            400,
            "epoch '0'",
        ),
        (
            "/v1/volumes/v/insync",
            r#"{"node":"a","epoch":1,"generation":1,"replicas":[{"address":"10.9.9.9:1","state":"in_sync"}]}"#,
            400,
            "replica address '10.9.9.9:1' is not the replica address of any registered node",
        ),
        ("/v1/nowhere", "{}", 404, "no route POST /v1/nowhere"),
        ("/v1/nodes", "{}", 405, "does not take POST"),
    ];
    for (path, body, status, needle) in cases {
        let r = control.client.post_json(path, body.as_bytes()).unwrap();
        let err = error_of(&r);
        assert_eq!(r.status, *status, "POST {path} {body}: {err}");
        assert!(
            err.contains(needle),
            "POST {path} {body}: '{err}' lacks '{needle}'"
        );
    }
    let huge = vec![b' '; cairn_control_api::BODY_BYTES_MAX + 1];
    let r = control
        .client
        .post_json("/v1/nodes/a/register", &huge)
        .unwrap();
    assert_eq!(r.status, 413);
    // Nothing was registered or recorded, and the process still serves.
    assert_eq!(control.get("/v1/nodes"), serde_json::json!([]));
    let r = control.client.get("/v1/volumes/v/insync").unwrap();
    assert_eq!(r.status, 404, "{}", error_of(&r));
    assert_eq!(control.get("/v1/volumes"), serde_json::json!([]));
    let r = control
        .client
        .post_json("/v1/nodes/a/register", good.as_bytes())
        .unwrap();
    assert_eq!(r.status, 200, "{}", error_of(&r));
    assert_eq!(control.node_state("a").as_deref(), Some("up"));
}
