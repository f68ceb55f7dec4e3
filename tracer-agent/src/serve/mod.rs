//! The HTTP endpoints on `--metrics-addr`: `/metrics`, the JSON API (`/api/v1/paths`,
//! `/api/v1/flows`), `/healthz` and `/readyz`, all answered from the latest snapshot, behind
//! the access policy of [`access`].
pub mod access;
pub mod api;
pub mod export;
pub mod listener;
pub(crate) mod process;
pub mod review;
pub mod tls;
use std::sync::Arc;

use axum::{
    Router,
    extract::{RawQuery, State},
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    pipeline::{blindness, snapshot::Snapshot},
    serve::{access::Access, api::ErrorResponse, export::Metrics},
};

#[derive(Clone)]
struct AppState {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Metrics,
}

impl AppState {
    fn latest(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshots.borrow())
    }
}

/// The routes, reading each poll's snapshot from `snapshots`, each request let in by `access`.
pub fn router(
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Metrics,
    access: Arc<Access>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route(api::PATHS, get(paths_handler))
        .route(api::FLOWS, get(flows_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz_handler))
        .layer(middleware::from_fn_with_state(access, access::guard))
        .with_state(AppState { snapshots, metrics })
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, export::CONTENT_TYPE)],
        state.metrics.render(&state.latest()),
    )
}

async fn paths_handler(State(state): State<AppState>) -> Response {
    json(StatusCode::OK, &state.latest().paths)
}

async fn flows_handler(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    match flows_limit(query.as_deref()) {
        Ok(limit) => json(StatusCode::OK, &state.latest().flows(limit)),
        Err(error) => json(StatusCode::BAD_REQUEST, &ErrorResponse { error }),
    }
}

async fn readyz_handler(State(state): State<AppState>) -> impl IntoResponse {
    let snapshot = state.latest();
    let paths = &snapshot.paths;
    // Blind interfaces are named whatever the readiness: the agent still works, the operator
    // must know what it cannot see (docs/design.md, "Blind interfaces").
    let blind: String = paths
        .blind_interfaces
        .iter()
        .map(|name| format!("- {}\n", blindness::describe(name)))
        .collect();
    if paths.ready {
        (StatusCode::OK, format!("ready\n{blind}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n- {}\n{blind}", paths.problems.join("\n- ")),
        )
    }
}

/// `limit` of `/api/v1/flows?limit=N`: absent means the default; anything but a whole number
/// in 1..=1000 is an error that names the parameter.
fn flows_limit(query: Option<&str>) -> Result<usize, String> {
    let value = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("limit="));
    let Some(value) = value else {
        return Ok(api::DEFAULT_FLOWS_LIMIT);
    };
    value
        .parse()
        .ok()
        .filter(|limit| (1..=api::MAX_FLOWS_LIMIT).contains(limit))
        .ok_or_else(|| {
            format!(
                "limit must be a whole number from 1 to {}, not {value:?}",
                api::MAX_FLOWS_LIMIT
            )
        })
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {error}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flows_limit_is_checked_and_named() {
        assert_eq!(flows_limit(None), Ok(api::DEFAULT_FLOWS_LIMIT));
        assert_eq!(flows_limit(Some("")), Ok(api::DEFAULT_FLOWS_LIMIT));
        assert_eq!(flows_limit(Some("limit=5")), Ok(5));
        assert_eq!(flows_limit(Some("pretty=1&limit=1000")), Ok(1000));
        for bad in ["limit=0", "limit=1001", "limit=-3", "limit=ten", "limit="] {
            let error = flows_limit(Some(bad)).expect_err(bad);
            assert!(error.starts_with("limit must be"), "{bad}: {error}");
        }
    }
}
