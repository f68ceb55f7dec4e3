//! Bearer tokens checked by the API server (`kube-standin` answering TokenReview and
//! SubjectAccessReview over HTTP): who may read which URL, the decisions reused for a while
//! rather than asked again, and an API server that is down giving no decision at all.
use kube_standin::StandIn;
use tracer_agent::serve::review::{Decision, Reviewer};

const PROMETHEUS: &str = "system:serviceaccount:monitoring:prometheus";
const APP: &str = "system:serviceaccount:default:app";

#[tokio::test]
async fn the_api_server_decides_and_its_answers_are_reused() {
    let mut stand_in = StandIn::start().await;
    stand_in.add_token("prometheus-token", PROMETHEUS);
    stand_in.add_token("app-token", APP);
    stand_in.grant(PROMETHEUS, "/metrics");
    stand_in.grant(PROMETHEUS, "/api/v1/*");
    let client = kube::Client::try_from(kube::Config::new(stand_in.url().parse().unwrap()))
        .expect("a client of the stand-in");
    let reviewer = Reviewer::new(client);

    let allowed = Decision::Allowed {
        user: PROMETHEUS.into(),
    };
    let decide = |token: &'static str, path: &'static str| reviewer.decide(token, path, "get");
    assert_eq!(
        decide("prometheus-token", "/metrics").await.unwrap(),
        allowed
    );
    assert_eq!(
        decide("prometheus-token", "/api/v1/flows").await.unwrap(),
        allowed
    );
    assert_eq!(
        decide("app-token", "/api/v1/flows").await.unwrap(),
        Decision::Forbidden { user: APP.into() }
    );
    assert_eq!(
        decide("invented", "/metrics").await.unwrap(),
        Decision::Unauthenticated
    );
    // TokenReview + SubjectAccessReview for each known token, TokenReview alone for the other.
    assert_eq!(stand_in.reviews(), 7);

    // Asked again at once: every answer comes from the cache, none from the API server.
    assert_eq!(
        decide("prometheus-token", "/metrics").await.unwrap(),
        allowed
    );
    assert_eq!(
        decide("invented", "/metrics").await.unwrap(),
        Decision::Unauthenticated
    );
    assert_eq!(stand_in.reviews(), 7);

    // Down: no decision, and an error rather than a refusal or a pass.
    stand_in.stop().await;
    let error = decide("another-token", "/metrics")
        .await
        .expect_err("no decision without the API server");
    assert!(error.to_string().contains("API server"), "{error}");
}
