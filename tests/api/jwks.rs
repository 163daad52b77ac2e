//! Keys from a JWKS (AUTH_JWKS_URL, served by a local HTTP server in the
//! test, and AUTH_JWKS_FILE): chosen by kid, rotated without a restart,
//! loaded again on an unknown kid at most once per interval, and held to the
//! same key-family rules as the PEM key.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{http::StatusCode, response::IntoResponse};
use channel_assignment::{config::AuthSettings, proto::GetIdentityRequest, startup::Application};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use sqlx::PgPool;
use tonic::{Code, Status};

use crate::helpers::*;

/// Key A, B, C and D of the fixtures: (kid, private key, JWK).
const RSA_A: (&str, &str, &str) = ("rsa-a", "rsa-private.pem", "jwk-rsa-a.json");
/// Its JWK names `alg: RS256`.
const RSA_B: (&str, &str, &str) = ("rsa-b", "rsa-other-private.pem", "jwk-rsa-b.json");
const EC_C: (&str, &str, &str) = ("ec-c", "es256-private.pem", "jwk-es256-c.json");
const ED_D: (&str, &str, &str) = ("ed-d", "ed25519-private.pem", "jwk-ed25519-d.json");

fn jwk(key: (&str, &str, &str)) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(key.2)).unwrap()).unwrap()
}

fn jwks(keys: &[(&str, &str, &str)]) -> serde_json::Value {
    json!({ "keys": keys.iter().map(|key| jwk(*key)).collect::<Vec<_>>() })
}

/// A token for ORG signed with `private_key`, naming `kid` when given.
fn sign(algorithm: Algorithm, private_key: &str, kid: Option<&str>) -> String {
    sign_claims(
        algorithm,
        private_key,
        kid,
        &json!({ "org_id": ORG, "exp": now() + 3600, "jti": uuid::Uuid::new_v4().to_string() }),
    )
}

fn sign_claims(
    algorithm: Algorithm,
    private_key: &str,
    kid: Option<&str>,
    claims: &serde_json::Value,
) -> String {
    let pem = std::fs::read(fixture(private_key)).unwrap();
    let key = match algorithm {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .unwrap();
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// A token signed by `key`, naming its kid; a fresh one each time (its
/// `jti` differs), so that it is verified, not found among remembered ones.
fn token_of(key: (&str, &str, &str), algorithm: Algorithm) -> String {
    sign(algorithm, key.1, Some(key.0))
}

/// Calls GetIdentity with `token`: Ok when the token is accepted.
async fn call(app: &TestApp, token: &str) -> Result<(), Status> {
    app.client
        .clone()
        .get_identity(with_bearer(
            GetIdentityRequest {
                agent_handle: "sales-agent".into(),
            },
            token,
        ))
        .await
        .map(drop)
}

/// Asserts UNAUTHENTICATED with this message.
fn assert_refused(result: Result<(), Status>, message: &str, case: &str) {
    let status = assert_error(result, Code::Unauthenticated, "UNAUTHENTICATED");
    assert_eq!(
        status.message(),
        format!("unauthenticated: {message}"),
        "{case}"
    );
}

/// Calls until `accepted` says the outcome is the wanted one, for at most
/// `within`; returns how long it took.
async fn eventually(
    app: &TestApp,
    token: &str,
    within: Duration,
    wanted: impl Fn(&Result<(), Status>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let outcome = call(app, token).await;
        if wanted(&outcome) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "still {outcome:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A JWKS endpoint on loopback: serves what the test puts in it, records
/// when it is asked, and fails on demand.
#[derive(Clone)]
struct JwksServer {
    url: url::Url,
    document: Arc<Mutex<serde_json::Value>>,
    hits: Arc<Mutex<Vec<Instant>>>,
    failing: Arc<AtomicBool>,
    /// 0: serve the document; else answer this status.
    status: Arc<AtomicU16>,
}

impl JwksServer {
    async fn start(document: serde_json::Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let server = Self {
            url: url.parse().unwrap(),
            document: Arc::new(Mutex::new(document)),
            hits: Arc::default(),
            failing: Arc::default(),
            status: Arc::default(),
        };
        let state = server.clone();
        let router = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let state = state.clone();
                async move {
                    state.hits.lock().unwrap().push(Instant::now());
                    if state.failing.load(Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    let status = state.status.load(Ordering::SeqCst);
                    if status != 0 {
                        return StatusCode::from_u16(status).unwrap().into_response();
                    }
                    let body = state.document.lock().unwrap().to_string();
                    ([("content-type", "application/json")], body).into_response()
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        server
    }

    fn publish(&self, document: serde_json::Value) {
        *self.document.lock().unwrap() = document;
    }

    fn hits(&self) -> Vec<Instant> {
        self.hits.lock().unwrap().clone()
    }
}

fn url_auth(url: &url::Url, interval: Duration, min_interval: Duration) -> AuthSettings {
    AuthSettings {
        hs256_secret: None,
        jwks_url: Some(url.clone()),
        jwks_refresh_interval: interval,
        jwks_min_refresh_interval: min_interval,
        ..AuthSettings::hs256(SECRET)
    }
}

#[sqlx::test]
async fn keys_rotate_through_the_jwks_url_with_an_overlap(pool: PgPool) {
    insert_identity(&pool, ORG, "sales-agent").await;
    let server = JwksServer::start(jwks(&[RSA_A])).await;
    let interval = Duration::from_millis(300);
    let app = spawn_app_with(&pool, url_auth(&server.url, interval, interval)).await;

    // A, the only key: accepted, and remembered.
    let remembered_a = token_of(RSA_A, Algorithm::RS256);
    call(&app, &remembered_a).await.expect("A accepted");
    call(&app, &remembered_a).await.expect("A accepted again");

    // {A, B}: the overlap. B is taken at the next load, A still is.
    server.publish(jwks(&[RSA_A, RSA_B]));
    eventually(
        &app,
        &token_of(RSA_B, Algorithm::RS256),
        Duration::from_secs(5),
        Result::is_ok,
    )
    .await;
    call(&app, &remembered_a)
        .await
        .expect("A during the overlap");
    call(&app, &token_of(RSA_A, Algorithm::PS256))
        .await
        .expect("a fresh token of A during the overlap");

    // The identity provider is down for a while: the last good keys stay.
    server.failing.store(true, Ordering::SeqCst);
    let failures_from = server.hits().len();
    while server.hits().len() < failures_from + 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    call(&app, &token_of(RSA_A, Algorithm::RS256))
        .await
        .expect("A while the JWKS cannot be fetched");
    call(&app, &token_of(RSA_B, Algorithm::RS256))
        .await
        .expect("B while the JWKS cannot be fetched");
    server.failing.store(false, Ordering::SeqCst);

    // {B}: A is refused from the next load on, the remembered token too.
    server.publish(jwks(&[RSA_B]));
    let took = eventually(&app, &remembered_a, Duration::from_secs(5), Result::is_err).await;
    assert_refused(
        call(&app, &remembered_a).await,
        "unknown key id (kid): no key of the JWKS has it",
        "A after its removal",
    );
    call(&app, &token_of(RSA_B, Algorithm::RS256))
        .await
        .expect("B after A's removal");
    // Within a refresh interval and the minimum one after a failure, plus
    // scheduling slack.
    assert!(took < 3 * interval + Duration::from_secs(1), "{took:?}");
    println!(
        "JWKS rotation: a removed key refused {took:?} after its removal (interval {interval:?})"
    );
}

#[sqlx::test]
async fn an_unknown_kid_loads_the_jwks_at_most_once_per_min_interval(pool: PgPool) {
    insert_identity(&pool, ORG, "sales-agent").await;
    let server = JwksServer::start(jwks(&[RSA_A])).await;
    let min_interval = Duration::from_secs(1);
    // No scheduled load during the test: every load is asked for by a kid.
    let app = spawn_app_with(
        &pool,
        url_auth(&server.url, Duration::from_secs(3600), min_interval),
    )
    .await;
    assert_eq!(server.hits().len(), 1, "one load at start");

    // C appears at the identity provider; tokens naming it arrive at once.
    server.publish(jwks(&[RSA_A, EC_C]));
    for _ in 0..30 {
        assert_refused(
            call(&app, &token_of(EC_C, Algorithm::ES256)).await,
            "unknown key id (kid): no key of the JWKS has it",
            "C before the load",
        );
    }
    // One load, once the minimum interval since the last one has passed,
    // brings C.
    eventually(
        &app,
        &token_of(EC_C, Algorithm::ES256),
        Duration::from_secs(5),
        Result::is_ok,
    )
    .await;
    assert_eq!(server.hits().len(), 2, "thirty unknown kids, one load");

    // A flood of kids nobody has: one more load per minimum interval.
    let stranger = sign(Algorithm::RS256, RSA_A.1, Some("nobody"));
    let flood_until = Instant::now() + Duration::from_millis(2500);
    let mut refused = 0;
    let mut last_request = Instant::now();
    while Instant::now() < flood_until {
        last_request = Instant::now();
        assert!(call(&app, &stranger).await.is_err());
        refused += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The load the last of them asked for comes within the minimum interval.
    tokio::time::sleep_until((last_request + min_interval + Duration::from_millis(300)).into())
        .await;
    let hits = server.hits();
    let gaps: Vec<Duration> = hits.windows(2).map(|w| w[1] - w[0]).collect();
    for gap in &gaps {
        assert!(
            *gap >= min_interval - Duration::from_millis(50),
            "two loads {gap:?} apart: {gaps:?}"
        );
    }
    // 2.5 s of flood: at most three loads after the second (two or three on
    // an idle machine, fewer if loads lag on a busy one; the gaps above are
    // the rule).
    assert!(
        (3..=5).contains(&hits.len()),
        "{} loads for {refused} unknown kids: {gaps:?}",
        hits.len()
    );

    // Nothing asks: nothing is loaded.
    let quiet = server.hits().len();
    tokio::time::sleep(min_interval + Duration::from_millis(300)).await;
    assert_eq!(server.hits().len(), quiet);
    println!(
        "unknown kids: {} loads for {refused} refused tokens over {:?}",
        hits.len() - 2,
        hits[hits.len() - 1] - hits[1]
    );
}

/// A JWKS file that the test replaces as Kubernetes replaces a mounted one:
/// a new file renamed over the old.
struct JwksFile(PathBuf);

impl JwksFile {
    fn new(content: &str) -> Self {
        let file = Self(std::env::temp_dir().join(format!("jwks-{}.json", uuid::Uuid::new_v4())));
        file.write(content);
        file
    }

    fn write(&self, content: &str) {
        let staged = self.0.with_extension("staged");
        std::fs::write(&staged, content).unwrap();
        std::fs::rename(&staged, &self.0).unwrap();
    }
}

impl Drop for JwksFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[sqlx::test]
async fn keys_rotate_through_the_jwks_file(pool: PgPool) {
    insert_identity(&pool, ORG, "sales-agent").await;
    let file = JwksFile::new(&jwks(&[RSA_A, ED_D]).to_string());
    let interval = Duration::from_millis(200);
    let auth = AuthSettings {
        hs256_secret: None,
        jwks_file: Some(file.0.clone()),
        jwks_refresh_interval: interval,
        jwks_min_refresh_interval: interval,
        ..AuthSettings::hs256(SECRET)
    };
    let app = spawn_app_with(&pool, auth).await;

    let remembered_a = token_of(RSA_A, Algorithm::RS256);
    call(&app, &remembered_a).await.expect("A");
    call(&app, &token_of(ED_D, Algorithm::EdDSA))
        .await
        .expect("D");

    file.write(&jwks(&[RSA_A, RSA_B]).to_string());
    eventually(
        &app,
        &token_of(RSA_B, Algorithm::RS256),
        Duration::from_secs(5),
        Result::is_ok,
    )
    .await;
    call(&app, &remembered_a)
        .await
        .expect("A during the overlap");

    // A file that does not parse keeps the last good keys.
    file.write("{ not json");
    tokio::time::sleep(3 * interval).await;
    call(&app, &remembered_a)
        .await
        .expect("A after a broken file");
    call(&app, &token_of(RSA_B, Algorithm::RS256))
        .await
        .expect("B after a broken file");

    file.write(&jwks(&[RSA_B]).to_string());
    eventually(&app, &remembered_a, Duration::from_secs(5), Result::is_err).await;
    assert_refused(
        call(&app, &remembered_a).await,
        "unknown key id (kid): no key of the JWKS has it",
        "A after its removal",
    );
    assert_refused(
        call(&app, &token_of(ED_D, Algorithm::EdDSA)).await,
        "unknown key id (kid): no key of the JWKS has it",
        "D after its removal",
    );
    call(&app, &token_of(RSA_B, Algorithm::RS256))
        .await
        .expect("B after A's removal");
}

#[sqlx::test]
async fn jwks_keys_keep_the_key_family_rules(pool: PgPool) {
    insert_identity(&pool, ORG, "sales-agent").await;
    // An HMAC key in the set, whose secret a forger knows: never used.
    let hmac_secret = "jwks-hmac-secret-0123456789abcdef";
    let mut document = jwks(&[RSA_A, RSA_B, EC_C, ED_D]);
    document["keys"].as_array_mut().unwrap().push(json!({
        "kty": "oct", "kid": "hmac",
        "k": base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, hmac_secret),
    }));
    let file = JwksFile::new(&document.to_string());
    let jwks_only = AuthSettings {
        hs256_secret: None,
        jwks_file: Some(file.0.clone()),
        ..AuthSettings::hs256(SECRET)
    };
    let with_secret = AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..jwks_only.clone()
    };
    let app = spawn_app_with(&pool, jwks_only).await;
    let app_with_secret = spawn_app_with(&pool, with_secret).await;
    let claims = json!({ "org_id": ORG, "exp": now() + 3600 });
    let rsa_a_public = std::fs::read_to_string(fixture("rsa-public.pem")).unwrap();
    let hs256_with_kid = |secret: &str, kid: &str| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };

    for (case, token) in [
        (
            "RS256, A (no alg in its JWK)",
            token_of(RSA_A, Algorithm::RS256),
        ),
        (
            "PS256, A (no alg in its JWK)",
            token_of(RSA_A, Algorithm::PS256),
        ),
        ("RS256, B", token_of(RSA_B, Algorithm::RS256)),
        ("ES256, C", token_of(EC_C, Algorithm::ES256)),
        ("EdDSA, D", token_of(ED_D, Algorithm::EdDSA)),
    ] {
        call(&app, &token)
            .await
            .unwrap_or_else(|status| panic!("{case}: {status:?}"));
    }

    let refused = [
        (
            "PS256 with B, whose JWK says RS256",
            &app,
            token_of(RSA_B, Algorithm::PS256),
            "token algorithm does not match its key",
        ),
        (
            "ES256 naming RSA key A",
            &app,
            sign(Algorithm::ES256, EC_C.1, Some(RSA_A.0)),
            "token algorithm does not match its key",
        ),
        (
            "signed by B, naming A",
            &app,
            sign(Algorithm::RS256, RSA_B.1, Some(RSA_A.0)),
            "bad token signature",
        ),
        (
            "HS256 with the JWKS's oct key",
            &app,
            hs256_with_kid(hmac_secret, "hmac"),
            "HS256 tokens are not accepted here: no shared secret is configured",
        ),
        (
            "HS256 keyed with A's public key, naming A",
            &app,
            hs256_with_kid(&rsa_a_public, RSA_A.0),
            "HS256 tokens are not accepted here: no shared secret is configured",
        ),
        (
            "HS256 keyed with A's public key, naming A, a secret configured",
            &app_with_secret,
            hs256_with_kid(&rsa_a_public, RSA_A.0),
            "bad token signature",
        ),
        (
            "HS256 with the oct key, a secret configured",
            &app_with_secret,
            hs256_with_kid(hmac_secret, "hmac"),
            "bad token signature",
        ),
        (
            "no kid, several RSA keys",
            &app,
            sign(Algorithm::RS256, RSA_A.1, None),
            "token has no key id (kid), which is needed to choose among the JWKS keys",
        ),
    ];
    for (case, app, token, message) in refused {
        assert_refused(call(app, &token).await, message, case);
    }
    // The shared secret still works beside the JWKS.
    call(&app_with_secret, &hs256_token(ORG))
        .await
        .expect("HS256 with the shared secret");
}

#[sqlx::test]
async fn a_single_key_jwks_takes_tokens_without_a_kid(pool: PgPool) {
    insert_identity(&pool, ORG, "sales-agent").await;
    let file = JwksFile::new(&jwks(&[EC_C]).to_string());
    let auth = AuthSettings {
        hs256_secret: None,
        jwks_file: Some(file.0.clone()),
        ..AuthSettings::hs256(SECRET)
    };
    let app = spawn_app_with(&pool, auth).await;

    call(&app, &sign(Algorithm::ES256, EC_C.1, None))
        .await
        .expect("the only key");
    assert_refused(
        call(&app, &sign(Algorithm::RS256, RSA_A.1, None)).await,
        "no configured key takes the token's algorithm",
        "RS256 with only an EC key",
    );
}

async fn start_error(pool: &PgPool, auth: AuthSettings) -> String {
    let settings = test_settings(auth);
    let error = Application::build(settings.clone(), database_for(pool, &settings))
        .await
        .err()
        .expect("refused");
    format!("{error:#}")
}

#[sqlx::test]
async fn the_server_refuses_to_start_without_its_jwks(pool: PgPool) {
    let auth_with_url =
        |url: &url::Url| url_auth(url, Duration::from_secs(60), Duration::from_secs(1));

    // Nothing listens.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/jwks.json", listener.local_addr().unwrap())
    };
    let error = start_error(&pool, auth_with_url(&closed.parse().unwrap())).await;
    assert!(
        error.starts_with(&format!("cannot load AUTH_JWKS_URL {closed}")),
        "{error}"
    );

    let server = JwksServer::start(jwks(&[RSA_A])).await;
    server.status.store(404, Ordering::SeqCst);
    let error = start_error(&pool, auth_with_url(&server.url)).await;
    assert!(error.contains("HTTP 404"), "{error}");

    server.status.store(0, Ordering::SeqCst);
    server.publish(
        json!({ "keys": [{ "kty": "oct", "k": "c2VjcmV0" }], "pad": "x".repeat(300 * 1024) }),
    );
    let error = start_error(&pool, auth_with_url(&server.url)).await;
    assert!(error.contains("larger than 256 KiB"), "{error}");

    server.publish(json!({ "keys": [{ "kty": "oct", "k": "c2VjcmV0" }] }));
    let error = start_error(&pool, auth_with_url(&server.url)).await;
    assert!(
        error.contains("holds no key that can verify tokens here"),
        "{error}"
    );

    // A server that never answers: the start gives up within the fetch time-out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url: url::Url = format!("http://{}/jwks.json", silent.local_addr().unwrap())
        .parse()
        .unwrap();
    let started = Instant::now();
    let error = start_error(&pool, auth_with_url(&silent_url)).await;
    let took = started.elapsed();
    assert!(error.contains("cannot load AUTH_JWKS_URL"), "{error}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    drop(silent);

    let missing = AuthSettings {
        hs256_secret: None,
        jwks_file: Some(fixture("no-such-jwks.json")),
        ..AuthSettings::hs256(SECRET)
    };
    let error = start_error(&pool, missing).await;
    assert!(error.starts_with("cannot load AUTH_JWKS_FILE"), "{error}");

    let not_jwks = JwksFile::new("[1, 2, 3]");
    let error = start_error(
        &pool,
        AuthSettings {
            hs256_secret: None,
            jwks_file: Some(not_jwks.0.clone()),
            ..AuthSettings::hs256(SECRET)
        },
    )
    .await;
    assert!(error.contains("not a JWKS"), "{error}");
}
