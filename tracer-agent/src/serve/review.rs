//! Who holds a bearer token, and whether they may read a URL: the API server's answer to a
//! TokenReview (authentication) and a SubjectAccessReview on the non-resource URL and verb
//! (authorization), as kube-rbac-proxy and the secure metrics servers of Kubernetes
//! controllers ask it. Decisions are cached briefly, so that a scraper costs the API server
//! two requests a minute rather than two per scrape.
use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use indexmap::IndexMap;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, api::PostParams};

/// How long an answer that lets a client in is reused: a right taken away in RBAC stops
/// working within this.
pub const ALLOWED_TTL: Duration = Duration::from_secs(60);

/// How long a refusal is reused: a right just granted works within this, and a client
/// retrying with a bad token costs the API server one review per this.
pub const DENIED_TTL: Duration = Duration::from_secs(10);

/// Decisions kept at once. A client sending a new token with each request would otherwise grow
/// the cache without bound; beyond this the oldest goes.
pub const MAX_CACHED: usize = 1024;

/// What the API server said of a token and a URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `user` may read the URL.
    Allowed { user: String },
    /// The token is no one's (unknown, expired, or for another audience).
    Unauthenticated,
    /// `user` is known, but RBAC does not let them `get` the URL.
    Forbidden { user: String },
}

/// Why the API server gave no decision.
#[derive(Debug, thiserror::Error)]
#[error("asking the API server: {0}")]
pub struct ReviewError(kube::Error);

/// Asks the API server and remembers its answers.
pub struct Reviewer {
    client: kube::Client,
    cache: Mutex<Cache>,
}

impl Reviewer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Whether the holder of `token` may `verb` (lower-case HTTP method) `path`.
    pub async fn decide(
        &self,
        token: &str,
        path: &str,
        verb: &str,
    ) -> Result<Decision, ReviewError> {
        let key = Key::new(token, path, verb);
        if let Some(decision) = self.cache().get(&key, Instant::now()) {
            return Ok(decision);
        }
        let decision = match self.authenticate(token).await? {
            None => Decision::Unauthenticated,
            Some(user) => {
                let username = user.username.clone().unwrap_or_default();
                if self.authorize(user, path, verb).await? {
                    Decision::Allowed { user: username }
                } else {
                    Decision::Forbidden { user: username }
                }
            }
        };
        self.cache().insert(key, decision.clone(), Instant::now());
        Ok(decision)
    }

    /// The token's user, when the API server knows it.
    async fn authenticate(&self, token: &str) -> Result<Option<UserInfo>, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(ReviewError)?;
        let status = answer.status.unwrap_or_default();
        Ok(status
            .authenticated
            .unwrap_or(false)
            .then_some(status.user)
            .flatten())
    }

    /// Whether RBAC lets `user` `verb` the non-resource URL `path`.
    async fn authorize(&self, user: UserInfo, path: &str, verb: &str) -> Result<bool, ReviewError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user
                    .extra
                    .map(|extra| extra.into_iter().collect::<BTreeMap<_, _>>()),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_owned()),
                    verb: Some(verb.to_owned()),
                }),
                resource_attributes: None,
            },
            ..SubjectAccessReview::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(ReviewError)?;
        Ok(answer.status.is_some_and(|status| status.allowed))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a decision is about: the token (as its SHA-256: the cache never holds a credential),
/// the URL and the verb.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    token: [u8; 32],
    path: String,
    verb: String,
}

impl Key {
    fn new(token: &str, path: &str, verb: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut token = [0; 32];
        token.copy_from_slice(digest.as_ref());
        Self {
            token,
            path: path.to_owned(),
            verb: verb.to_owned(),
        }
    }
}

/// Decisions until they expire, at most [`MAX_CACHED`], oldest first.
#[derive(Default)]
struct Cache {
    decisions: IndexMap<Key, (Decision, Instant)>,
}

impl Cache {
    fn get(&self, key: &Key, now: Instant) -> Option<Decision> {
        self.decisions
            .get(key)
            .filter(|(_, expires)| now < *expires)
            .map(|(decision, _)| decision.clone())
    }

    fn insert(&mut self, key: Key, decision: Decision, now: Instant) {
        let ttl = match decision {
            Decision::Allowed { .. } => ALLOWED_TTL,
            Decision::Unauthenticated | Decision::Forbidden { .. } => DENIED_TTL,
        };
        self.decisions.shift_remove(&key);
        if self.decisions.len() >= MAX_CACHED {
            self.decisions.retain(|_, (_, expires)| now < *expires);
        }
        if self.decisions.len() >= MAX_CACHED {
            self.decisions.shift_remove_index(0);
        }
        self.decisions.insert(key, (decision, now + ttl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Decision {
        Decision::Allowed {
            user: "system:serviceaccount:monitoring:prometheus".into(),
        }
    }

    #[test]
    fn refusals_expire_sooner_than_permissions() {
        let mut cache = Cache::default();
        let start = Instant::now();
        let good = Key::new("good", "/metrics", "get");
        let bad = Key::new("bad", "/metrics", "get");
        cache.insert(good.clone(), allowed(), start);
        cache.insert(bad.clone(), Decision::Unauthenticated, start);
        let later = start + DENIED_TTL;
        assert_eq!(cache.get(&good, later), Some(allowed()));
        assert_eq!(cache.get(&bad, later), None);
        assert_eq!(cache.get(&good, start + ALLOWED_TTL), None);
    }

    #[test]
    fn a_decision_is_for_one_token_url_and_verb() {
        let mut cache = Cache::default();
        let now = Instant::now();
        cache.insert(Key::new("token", "/metrics", "get"), allowed(), now);
        assert_eq!(
            cache.get(&Key::new("token", "/api/v1/flows", "get"), now),
            None
        );
        assert_eq!(cache.get(&Key::new("token", "/metrics", "post"), now), None);
        assert_eq!(cache.get(&Key::new("token2", "/metrics", "get"), now), None);
    }

    /// A client inventing a token per request cannot grow the cache, and an entry that is
    /// still good survives its flood when it is newer than the oldest.
    #[test]
    fn a_flood_of_tokens_stays_within_the_bound() {
        let mut cache = Cache::default();
        let now = Instant::now();
        for n in 0..MAX_CACHED * 3 {
            let key = Key::new(&format!("invented-{n}"), "/api/v1/flows", "get");
            cache.insert(key, Decision::Unauthenticated, now);
        }
        assert_eq!(cache.decisions.len(), MAX_CACHED);
        let scraper = Key::new("prometheus", "/metrics", "get");
        cache.insert(scraper.clone(), allowed(), now);
        assert_eq!(cache.decisions.len(), MAX_CACHED);
        assert_eq!(cache.get(&scraper, now), Some(allowed()));
        // Expired entries go first when the cache is full.
        let later = now + DENIED_TTL;
        cache.insert(Key::new("late", "/metrics", "get"), allowed(), later);
        assert_eq!(cache.decisions.len(), 2);
    }
}
