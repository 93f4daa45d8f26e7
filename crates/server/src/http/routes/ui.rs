//! The web console at `/ui`: static files compiled into the binary, so that users run no build
//! step and the console always matches the daemon that serves it. The page talks to the same
//! origin's API with the key the user signs in with (kept in the tab's sessionStorage), so it
//! needs no CORS; it is not part of the OpenAPI document.
//!
//! Every answer carries a strict Content-Security-Policy: scripts only from `/ui` itself (no
//! inline script, no eval), connections only to this origin (the API and the shell WebSocket),
//! no framing. Styles also allow inline `<style>` elements because xterm.js writes its
//! terminal's dimensions and theme into one; styles cannot run code.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::api;
use crate::error::Error;

/// Generic over the state because the console's routes use none.
pub(in crate::http) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { asset("index.html") }))
        .route("/ui/{*file}", get(file))
}

/// The policy of every console answer (see the header comment for why styles differ).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The console's files: path under `/ui/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../../ui/index.html"),
    ),
    ("app.js", JS, include_bytes!("../../../ui/app.js")),
    ("api.js", JS, include_bytes!("../../../ui/api.js")),
    ("dom.js", JS, include_bytes!("../../../ui/dom.js")),
    ("views.js", JS, include_bytes!("../../../ui/views.js")),
    ("nodes.js", JS, include_bytes!("../../../ui/nodes.js")),
    ("sandbox.js", JS, include_bytes!("../../../ui/sandbox.js")),
    ("charts.js", JS, include_bytes!("../../../ui/charts.js")),
    ("style.css", CSS, include_bytes!("../../../ui/style.css")),
    (
        "vendor/xterm/xterm.mjs",
        JS,
        include_bytes!("../../../ui/vendor/xterm/xterm.mjs"),
    ),
    (
        "vendor/xterm/xterm.css",
        CSS,
        include_bytes!("../../../ui/vendor/xterm/xterm.css"),
    ),
    (
        "vendor/xterm/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../../ui/vendor/xterm/LICENSE"),
    ),
];
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

async fn file(Path(file): Path<String>) -> Response {
    asset(&file)
}

fn asset(file: &str) -> Response {
    let Some((_, kind, body)) = ASSETS.iter().find(|(name, _, _)| *name == file) else {
        return Error::NotFound(format!(
            "no console file {}; the console starts at /ui/",
            api::quote(file)
        ))
        .into_response();
    };
    let mut resp = (StatusCode::OK, *body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with the binary: a browser must ask again rather than keep an old copy.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get_(path: &str) -> Response {
        router::<()>()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn index_and_assets_are_served_with_the_policy() {
        for (path, kind) in [
            ("/ui/", "text/html; charset=utf-8"),
            ("/ui/app.js", JS),
            ("/ui/vendor/xterm/xterm.mjs", JS),
            ("/ui/style.css", CSS),
        ] {
            let r = get_(path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], kind, "{path}");
            assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
            assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        let r = get_("/ui").await;
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()[header::LOCATION], "/ui/");
    }

    #[tokio::test]
    async fn only_the_listed_files_exist() {
        for path in [
            "/ui/nope.js",
            "/ui/../Cargo.toml",
            "/ui/vendor/xterm/xterm.js.map",
        ] {
            assert_eq!(get_(path).await.status(), StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[test]
    fn the_policy_allows_no_inline_or_foreign_script() {
        let script = CSP
            .split(';')
            .map(str::trim)
            .find(|d| d.starts_with("script-src"))
            .unwrap();
        assert_eq!(script, "script-src 'self'");
        assert!(CSP.contains("connect-src 'self'") && CSP.contains("frame-ancestors 'none'"));
    }
}
