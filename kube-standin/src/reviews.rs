//! TokenReview and SubjectAccessReview, as the API server answers them for a client that
//! authenticates and authorizes its own callers (the agent's HTTPS side): the tokens the test
//! registered, and RBAC's non-resource rules reduced to what they say of a user, a URL and a
//! verb.
use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse as _, Response},
};
use serde_json::{Value, json};

use crate::Shared;

/// Who a token belongs to, and what they may `get`.
#[derive(Default)]
pub(crate) struct Identities {
    /// token → username.
    tokens: Vec<(String, String)>,
    /// (username, non-resource URL pattern): exact, or a prefix ending in `*`, as in RBAC.
    grants: Vec<(String, String)>,
    /// Reviews answered, both kinds.
    pub(crate) reviews: u64,
}

impl Identities {
    pub(crate) fn add_token(&mut self, token: &str, user: &str) {
        self.tokens.push((token.to_owned(), user.to_owned()));
    }

    pub(crate) fn grant(&mut self, user: &str, pattern: &str) {
        self.grants.push((user.to_owned(), pattern.to_owned()));
    }

    fn user(&self, token: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(known, _)| known == token)
            .map(|(_, user)| user.as_str())
    }

    /// RBAC grants `get` only here: the agent serves nothing else.
    fn allows(&self, user: &str, path: &str, verb: &str) -> bool {
        verb == "get"
            && self.grants.iter().any(|(granted, pattern)| {
                granted == user
                    && match pattern.strip_suffix('*') {
                        Some(prefix) => path.starts_with(prefix),
                        None => path == pattern,
                    }
            })
    }
}

pub(crate) async fn token_review(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(mut review) = parse(&body) else {
        return bad_request();
    };
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut store = shared.store();
    store.identities.reviews += 1;
    review["status"] = match store.identities.user(&token) {
        Some(user) => json!({"authenticated": true, "user": {
            "username": user, "uid": format!("uid-{user}"),
            "groups": ["system:serviceaccounts", "system:authenticated"]}}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    created(review)
}

pub(crate) async fn subject_access_review(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Response {
    let Some(mut review) = parse(&body) else {
        return bad_request();
    };
    let spec = &review["spec"];
    let user = spec["user"].as_str().unwrap_or_default();
    let path = spec["nonResourceAttributes"]["path"]
        .as_str()
        .unwrap_or_default();
    let verb = spec["nonResourceAttributes"]["verb"]
        .as_str()
        .unwrap_or_default();
    let mut store = shared.store();
    store.identities.reviews += 1;
    let allowed = store.identities.allows(user, path, verb);
    review["status"] = if allowed {
        json!({"allowed": true, "reason": "granted by the stand-in"})
    } else {
        json!({"allowed": false})
    };
    created(review)
}

fn parse(body: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
}

fn bad_request() -> Response {
    (StatusCode::BAD_REQUEST, "a review must be a JSON object").into_response()
}

/// A review is answered 201 Created, itself with its status filled in.
fn created(review: Value) -> Response {
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        review.to_string(),
    )
        .into_response()
}
