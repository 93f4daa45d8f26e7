//! Checks of a response against the daemon's OpenAPI document: the status must be documented
//! for its route, and a JSON body must validate against the documented schema. Used by the
//! end-to-end tests of `moat serve` and by the in-process router tests of moat-server.

use serde_json::Value;

/// The response must be documented for its route (status code), and a JSON body must validate
/// against the documented schema.
pub fn check_response(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let path_only = path.split('?').next().unwrap();
    let Some((template, item)) = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(t, _)| template_matches(t, path_only))
    else {
        // Unknown endpoints answer with the error shape; there is no route to document.
        assert_eq!(status, 404, "{method} {path}");
        assert!(body["error"]["code"].is_string(), "{body}");
        return;
    };
    let op = &item[method.to_ascii_lowercase()];
    assert!(
        op.is_object(),
        "{method} {template} is not in the OpenAPI document"
    );
    let resp = &op["responses"][status.to_string()];
    assert!(
        resp.is_object(),
        "status {status} of {method} {template} is not in the OpenAPI document (body {body})"
    );
    let schema = &resp["content"]["application/json"]["schema"];
    if schema.is_null() {
        if resp["content"].is_null() {
            assert!(
                body.is_null(),
                "{method} {template} {status}: undocumented body {body}"
            );
        }
        return;
    }
    validate(doc, schema, body, &format!("{method} {template} {status}"));
}

/// `body` must validate against `schema`, a schema of the OpenAPI document `doc`.
pub fn validate(doc: &Value, schema: &Value, body: &Value, what: &str) {
    // `$ref`s point into the document's components: give the schema a copy of them.
    let mut root = schema.clone();
    root["components"] = doc["components"].clone();
    let validator = jsonschema::validator_for(&root).expect("a valid schema");
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{what}: body {body} does not match the document: {errors:?}"
    );
}

pub fn template_matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let mut p: Vec<&str> = path.split('/').collect();
    // A last `{path}` takes the rest of the path, any number of segments (the port proxy).
    if t.last() == Some(&"{path}") && p.len() > t.len() {
        let rest = p.split_off(t.len() - 1);
        p.push(if rest.iter().all(|s| s.is_empty()) {
            ""
        } else {
            "rest"
        });
    }
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && !p.is_empty()) || t == p)
}
