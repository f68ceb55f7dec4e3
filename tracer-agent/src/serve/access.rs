//! Who may read what. The agent sees every connection of its node: the addresses and pod
//! names of `/api/v1/*` (and, by default, the workloads of `/metrics`) are answered without
//! credentials only to the node itself, over loopback (`tracer top`, `kubectl port-forward`,
//! `kubectl exec`). Any other client needs HTTPS and a bearer token that the API server
//! authenticates and authorizes for the URL ([`review`](super::review)); `/healthz` and
//! `/readyz` stay open to everyone (the kubelet probes them).
use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse as _, Response},
};
use tracing::{debug, warn};

use crate::serve::review::{Decision, Reviewer};

/// How the client of a request reached the agent, set by the listener on every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// From the node's own loopback (127.0.0.0/8, ::1).
    pub loopback: bool,
    /// Over TLS.
    pub tls: bool,
}

/// Who may read `/metrics` from outside the node's loopback (`--metrics-auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsAuth {
    /// HTTPS and a bearer token allowed to `get` /metrics, as for /api/v1/*.
    Token,
    /// Anyone who reaches the port, over HTTP or HTTPS.
    None,
}

/// What a URL asks of a client outside loopback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    Nothing,
    Token,
}

fn need(path: &str, metrics_auth: MetricsAuth) -> Need {
    match (path, metrics_auth) {
        ("/healthz" | "/readyz", _) | ("/metrics", MetricsAuth::None) => Need::Nothing,
        _ => Need::Token,
    }
}

/// What to do with a request before reading its credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Serve,
    /// A token would cross the network in clear: refused whatever it holds.
    NeedsTls,
    Review,
}

fn gate(need: Need, peer: Peer) -> Gate {
    match (need, peer) {
        (Need::Nothing, _) | (_, Peer { loopback: true, .. }) => Gate::Serve,
        (Need::Token, Peer { tls: false, .. }) => Gate::NeedsTls,
        (Need::Token, Peer { tls: true, .. }) => Gate::Review,
    }
}

/// The access policy and what checks tokens.
pub struct Access {
    pub metrics_auth: MetricsAuth,
    /// None without the Kubernetes context: then only loopback reads what needs a token.
    pub reviewer: Option<Reviewer>,
}

/// The middleware in front of every route.
pub async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    // A request that did not come through the listener (none does) is treated as the most
    // distant client.
    let peer = request.extensions().get::<Peer>().copied().unwrap_or(Peer {
        loopback: false,
        tls: false,
    });
    let path = request.uri().path();
    match gate(need(path, access.metrics_auth), peer) {
        Gate::Serve => next.run(request).await,
        Gate::NeedsTls => refuse(
            StatusCode::FORBIDDEN,
            format!(
                "{path} is answered to clients outside the node only over HTTPS, with a bearer token\n"
            ),
        ),
        Gate::Review => {
            let Some(token) = bearer(&request) else {
                return unauthenticated(format!("{path} needs a bearer token\n"));
            };
            let Some(reviewer) = &access.reviewer else {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "this agent has no Kubernetes API to check tokens with: {path} is answered on the node's loopback only\n"
                    ),
                );
            };
            let verb = request.method().as_str().to_ascii_lowercase();
            match reviewer.decide(token, path, &verb).await {
                Ok(Decision::Allowed { user }) => {
                    debug!(%user, path, "allowed");
                    next.run(request).await
                }
                Ok(Decision::Unauthenticated) => {
                    unauthenticated("the API server does not know this token\n".to_owned())
                }
                Ok(Decision::Forbidden { user }) => refuse(
                    StatusCode::FORBIDDEN,
                    format!("{user} may not {verb} {path}\n"),
                ),
                Err(error) => {
                    warn!(path, "cannot check a token: {error}");
                    refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("cannot check the token now: {error}\n"),
                    )
                }
            }
        }
    }
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn refuse(status: StatusCode, body: String) -> Response {
    (status, body).into_response()
}

fn unauthenticated(body: String) -> Response {
    let mut response = refuse(StatusCode::UNAUTHORIZED, body);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tracer\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: Peer = Peer {
        loopback: true,
        tls: false,
    };
    const REMOTE_PLAIN: Peer = Peer {
        loopback: false,
        tls: false,
    };
    const REMOTE_TLS: Peer = Peer {
        loopback: false,
        tls: true,
    };

    #[test]
    fn only_loopback_reads_connections_without_a_token() {
        let cases = [
            // (path, --metrics-auth, peer, gate)
            ("/api/v1/flows", MetricsAuth::Token, LOOPBACK, Gate::Serve),
            (
                "/api/v1/flows",
                MetricsAuth::None,
                REMOTE_PLAIN,
                Gate::NeedsTls,
            ),
            ("/api/v1/paths", MetricsAuth::None, REMOTE_TLS, Gate::Review),
            ("/metrics", MetricsAuth::Token, LOOPBACK, Gate::Serve),
            ("/metrics", MetricsAuth::Token, REMOTE_PLAIN, Gate::NeedsTls),
            ("/metrics", MetricsAuth::Token, REMOTE_TLS, Gate::Review),
            ("/metrics", MetricsAuth::None, REMOTE_PLAIN, Gate::Serve),
            ("/metrics", MetricsAuth::None, REMOTE_TLS, Gate::Serve),
            ("/healthz", MetricsAuth::Token, REMOTE_PLAIN, Gate::Serve),
            ("/readyz", MetricsAuth::Token, REMOTE_PLAIN, Gate::Serve),
            // Unknown paths are not a way around: they need what the API needs.
            ("/metrics/", MetricsAuth::None, REMOTE_PLAIN, Gate::NeedsTls),
            ("/nothing", MetricsAuth::Token, REMOTE_TLS, Gate::Review),
        ];
        for (path, metrics_auth, peer, expected) in cases {
            assert_eq!(
                gate(need(path, metrics_auth), peer),
                expected,
                "{path} {metrics_auth:?} {peer:?}"
            );
        }
    }

    #[test]
    fn the_bearer_token_is_read_from_its_header_only() {
        let with = |value: &str| {
            Request::builder()
                .header(header::AUTHORIZATION, value)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        assert_eq!(bearer(&with("Bearer abc.def")), Some("abc.def"));
        assert_eq!(bearer(&with("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&with("Basic dXNlcjpwYXNz")), None);
        assert_eq!(bearer(&with("Bearer ")), None);
        let none = Request::builder().body(axum::body::Body::empty()).unwrap();
        assert_eq!(bearer(&none), None);
    }
}
