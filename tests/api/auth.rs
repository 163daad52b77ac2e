//! Who the caller is: verified JWTs (HS256 and asymmetric), the opt-in
//! trusted header, and everything that must be refused.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use channel_assignment::{
    config::AuthSettings,
    proto::{self, AssignMailboxRequest, Identity},
    startup::Application,
};
use jsonwebtoken::Algorithm;
use serde_json::json;
use sqlx::PgPool;
use tonic::{Code, Request, Status};

use crate::helpers::*;

/// An organization with an identity and a free mailbox; returns the mailbox.
async fn seed(pool: &PgPool) -> String {
    insert_identity(pool, ORG, "sales-agent").await;
    insert_mailbox(pool, ORG).await.to_string()
}

async fn assign_with(
    app: &TestApp,
    request: Request<AssignMailboxRequest>,
) -> Result<Identity, Status> {
    app.client
        .clone()
        .assign_mailbox(request)
        .await
        .map(tonic::Response::into_inner)
}

fn request(mailbox: &str) -> AssignMailboxRequest {
    AssignMailboxRequest {
        agent_handle: "sales-agent".to_owned(),
        mailbox_id: mailbox.to_owned(),
    }
}

fn with_metadata(
    mailbox: &str,
    metadata: &[(&'static str, &str)],
) -> Request<AssignMailboxRequest> {
    let mut request = Request::new(request(mailbox));
    for (key, value) in metadata {
        request
            .metadata_mut()
            .append(*key, value.parse().expect("ascii"));
    }
    request
}

fn unsigned_token(claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

fn public_key_auth(file: &str) -> AuthSettings {
    AuthSettings {
        hs256_secret: None,
        public_key_file: Some(fixture(file)),
        ..AuthSettings::hs256(SECRET)
    }
}

#[sqlx::test]
async fn every_rpc_refuses_a_call_without_a_token(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;
    let mut client = app.client.clone();

    let results: [Result<(), Status>; 4] = [
        client.assign_mailbox(request(&mailbox)).await.map(drop),
        client
            .unassign_mailbox(proto::UnassignMailboxRequest {
                agent_handle: "sales-agent".into(),
            })
            .await
            .map(drop),
        client
            .assign_phone_number(proto::AssignPhoneNumberRequest {
                agent_handle: "sales-agent".into(),
                phone_number_id: uuid::Uuid::new_v4().to_string(),
            })
            .await
            .map(drop),
        client
            .unassign_phone_number(proto::UnassignPhoneNumberRequest {
                agent_handle: "sales-agent".into(),
            })
            .await
            .map(drop),
    ];

    for result in results {
        assert_error(result, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn unusable_tokens_are_unauthenticated(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;
    let valid_claims = json!({ "org_id": ORG, "exp": now() + 3600 });
    let cases: Vec<(&str, String)> = vec![
        (
            "bad signature",
            sign_hs256(&valid_claims, "some-other-secret-0123456789"),
        ),
        (
            "expired",
            sign_hs256(&json!({ "org_id": ORG, "exp": now() - 60 }), SECRET),
        ),
        ("no exp", sign_hs256(&json!({ "org_id": ORG }), SECRET)),
        (
            "not yet valid",
            sign_hs256(
                &json!({ "org_id": ORG, "exp": now() + 3600, "nbf": now() + 600 }),
                SECRET,
            ),
        ),
        ("alg none", unsigned_token(&valid_claims)),
        ("alg none, signature kept", {
            let signed = hs256_token(ORG);
            let signature = signed.rsplit('.').next().unwrap().to_owned();
            format!("{}{signature}", unsigned_token(&valid_claims))
        }),
        ("not a jwt", "not.a.jwt".to_owned()),
        (
            "asymmetric alg, no key configured",
            sign_with_pem(Algorithm::EdDSA, "ed25519-private.pem", &valid_claims),
        ),
        ("huge", "a".repeat(20_000)),
        (
            "huge but signed",
            sign_hs256(
                &json!({ "org_id": ORG, "exp": now() + 3600, "pad": "x".repeat(10_000) }),
                SECRET,
            ),
        ),
    ];

    for (case, token) in cases {
        let result = assign_with(&app, with_bearer(request(&mailbox), &token)).await;
        assert!(result.is_err(), "{case}: accepted");
        let status = assert_error(result, Code::Unauthenticated, "UNAUTHENTICATED");
        if token.len() > 8192 {
            assert_eq!(
                status.message(),
                "unauthenticated: token longer than 8192 bytes",
                "{case}"
            );
        }
    }
    for (case, header) in [
        ("basic scheme", format!("Basic {}", hs256_token(ORG))),
        ("bare token", hs256_token(ORG)),
        ("empty bearer", "Bearer ".to_owned()),
    ] {
        let result =
            assign_with(&app, with_metadata(&mailbox, &[("authorization", &header)])).await;
        assert!(result.is_err(), "{case}: accepted");
        assert_error(result, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    let token = format!("Bearer {}", hs256_token(ORG));
    let duplicated = with_metadata(
        &mailbox,
        &[("authorization", &token), ("authorization", &token)],
    );
    assert_error(
        assign_with(&app, duplicated).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn a_valid_token_without_a_well_formed_organization_is_permission_denied(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;
    let exp = now() + 3600;
    let claims = [
        json!({ "exp": exp }),
        json!({ "exp": exp, "org_id": null }),
        json!({ "exp": exp, "org_id": "" }),
        json!({ "exp": exp, "org_id": 42 }),
        json!({ "exp": exp, "org_id": { "id": ORG } }),
        json!({ "exp": exp, "org_id": [ORG] }),
        json!({ "exp": exp, "org_id": "org with spaces" }),
        json!({ "exp": exp, "org_id": "org/../other" }),
        json!({ "exp": exp, "org_id": "x".repeat(65) }),
    ];

    for claims in claims {
        let token = sign_hs256(&claims, SECRET);
        assert_error(
            assign_with(&app, with_bearer(request(&mailbox), &token)).await,
            Code::PermissionDenied,
            "ORGANIZATION_ID_MISSING",
        );
    }
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn the_trusted_header_is_ignored_unless_enabled(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;

    assert_error(
        assign_with(&app, with_metadata(&mailbox, &[("x-organization-id", ORG)])).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    assert_eq!(snapshot(&pool).await, before);

    // With a token, the header cannot move the caller to another organization.
    let mut spoofed = authorized(request(&mailbox), ORG);
    spoofed
        .metadata_mut()
        .insert("x-organization-id", OTHER_ORG.parse().unwrap());
    let identity = assign_with(&app, spoofed)
        .await
        .expect("the token's organization");
    assert_eq!(identity.organization_id, ORG);
}

#[sqlx::test]
async fn the_trusted_header_names_the_organization_when_enabled(pool: PgPool) {
    let auth = AuthSettings {
        trusted_header: true,
        hs256_secret: None,
        ..AuthSettings::hs256(SECRET)
    };
    let app = spawn_app_with(&pool, auth).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;

    assert_error(
        assign_with(
            &app,
            with_metadata(&mailbox, &[("x-organization-id", "not valid!")]),
        )
        .await,
        Code::PermissionDenied,
        "ORGANIZATION_ID_MISSING",
    );
    assert_error(
        assign_with(
            &app,
            with_metadata(
                &mailbox,
                &[("x-organization-id", ORG), ("x-organization-id", ORG)],
            ),
        )
        .await,
        Code::PermissionDenied,
        "ORGANIZATION_ID_MISSING",
    );
    assert_error(
        assign_with(&app, with_metadata(&mailbox, &[])).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    assert_error(
        assign_with(
            &app,
            with_metadata(&mailbox, &[("x-organization-id", OTHER_ORG)]),
        )
        .await,
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );
    assert_eq!(snapshot(&pool).await, before);

    let identity = assign_with(&app, with_metadata(&mailbox, &[("x-organization-id", ORG)]))
        .await
        .expect("the header's organization");
    assert_eq!(identity.organization_id, ORG);
}

#[sqlx::test]
async fn a_token_beside_the_trusted_header_must_be_valid_and_agree(pool: PgPool) {
    let auth = AuthSettings {
        trusted_header: true,
        ..AuthSettings::hs256(SECRET)
    };
    let app = spawn_app_with(&pool, auth).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;

    let refused = [
        (
            "a valid token of another organization",
            format!("Bearer {}", hs256_token(OTHER_ORG)),
            Code::PermissionDenied,
            "ORGANIZATION_ID_MISSING",
        ),
        (
            "garbage",
            "Bearer garbage.x.y".to_owned(),
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        ),
        (
            "a token signed with another secret",
            format!(
                "Bearer {}",
                sign_hs256(
                    &json!({ "org_id": ORG, "exp": now() + 3600 }),
                    "another-secret-0123456789abcdef0123"
                )
            ),
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        ),
        (
            "an expired token",
            format!(
                "Bearer {}",
                sign_hs256(&json!({ "org_id": ORG, "exp": now() - 3600 }), SECRET)
            ),
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        ),
        (
            "not a bearer token",
            "Basic dXNlcjpwYXNz".to_owned(),
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        ),
    ];
    for (case, authorization, code, reason) in refused {
        let result = assign_with(
            &app,
            with_metadata(
                &mailbox,
                &[
                    ("x-organization-id", ORG),
                    ("authorization", &authorization),
                ],
            ),
        )
        .await;
        assert!(result.is_err(), "{case}: accepted");
        assert_error(result, code, reason);
    }
    // Acting for the token's organization instead would not be right either.
    let conflicting = assign_with(
        &app,
        with_metadata(
            &mailbox,
            &[
                ("x-organization-id", OTHER_ORG),
                ("authorization", &format!("Bearer {}", hs256_token(ORG))),
            ],
        ),
    )
    .await;
    assert_error(
        conflicting,
        Code::PermissionDenied,
        "ORGANIZATION_ID_MISSING",
    );
    assert_eq!(snapshot(&pool).await, before);

    let agreeing = assign_with(
        &app,
        with_metadata(
            &mailbox,
            &[
                ("x-organization-id", ORG),
                ("authorization", &format!("Bearer {}", hs256_token(ORG))),
            ],
        ),
    )
    .await
    .expect("header and token agree");
    assert_eq!(agreeing.organization_id, ORG);
}

#[sqlx::test]
async fn issuer_and_audience_are_checked_when_configured(pool: PgPool) {
    let auth = AuthSettings {
        issuer: Some("https://idp.example".into()),
        audience: Some("channel-assignment".into()),
        ..AuthSettings::hs256(SECRET)
    };
    let app = spawn_app_with(&pool, auth).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;
    let exp = now() + 3600;

    for claims in [
        json!({ "org_id": ORG, "exp": exp, "iss": "https://idp.example", "aud": "someone-else" }),
        json!({ "org_id": ORG, "exp": exp, "iss": "https://evil.example", "aud": "channel-assignment" }),
        json!({ "org_id": ORG, "exp": exp, "aud": "channel-assignment" }),
        json!({ "org_id": ORG, "exp": exp, "iss": "https://idp.example" }),
    ] {
        let token = sign_hs256(&claims, SECRET);
        assert_error(
            assign_with(&app, with_bearer(request(&mailbox), &token)).await,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
    }
    assert_eq!(snapshot(&pool).await, before);

    let token = sign_hs256(
        &json!({ "org_id": ORG, "exp": exp, "iss": "https://idp.example", "aud": ["other", "channel-assignment"] }),
        SECRET,
    );
    assign_with(&app, with_bearer(request(&mailbox), &token))
        .await
        .expect("accepted");
}

#[sqlx::test]
async fn asymmetric_tokens_are_verified_with_the_public_key(pool: PgPool) {
    let mailbox = seed(&pool).await;
    let claims = json!({ "org_id": ORG, "exp": now() + 3600 });
    for (algorithm, private_key, public_key) in [
        (
            Algorithm::EdDSA,
            "ed25519-private.pem",
            "ed25519-public.pem",
        ),
        (Algorithm::ES256, "es256-private.pem", "es256-public.pem"),
        (Algorithm::RS256, "rsa-private.pem", "rsa-public.pem"),
        (Algorithm::PS256, "rsa-private.pem", "rsa-public.pem"),
        (Algorithm::RS256, "rsa-private.pem", "rsa-public-pkcs1.pem"),
    ] {
        let app = spawn_app_with(&pool, public_key_auth(public_key)).await;
        let token = sign_with_pem(algorithm, private_key, &claims);
        let identity = assign_with(&app, with_bearer(request(&mailbox), &token))
            .await
            .unwrap_or_else(|status| panic!("{algorithm:?}: {status:?}"));
        assert_eq!(identity.organization_id, ORG);
    }
}

#[sqlx::test]
async fn wrong_keys_and_algorithm_confusion_are_refused(pool: PgPool) {
    let rsa_and_secret = AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..public_key_auth("rsa-public.pem")
    };
    let app = spawn_app_with(&pool, rsa_and_secret).await;
    let only_rsa = spawn_app_with(&pool, public_key_auth("rsa-public.pem")).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;
    let claims = json!({ "org_id": ORG, "exp": now() + 3600 });
    let public_pem = std::fs::read_to_string(fixture("rsa-public.pem")).unwrap();

    let cases = [
        (
            "another RSA key",
            &app,
            sign_with_pem(Algorithm::RS256, "rsa-other-private.pem", &claims),
        ),
        (
            "HS256 keyed with the public key",
            &app,
            sign_hs256(&claims, &public_pem),
        ),
        (
            "HS256 keyed with the public key, no secret configured",
            &only_rsa,
            sign_hs256(&claims, &public_pem),
        ),
        (
            "HS256 with the right secret, HS256 not configured",
            &only_rsa,
            hs256_token(ORG),
        ),
        (
            "ES256 against an RSA key",
            &app,
            sign_with_pem(Algorithm::ES256, "es256-private.pem", &claims),
        ),
    ];
    for (case, app, token) in cases {
        let result = assign_with(app, with_bearer(request(&mailbox), &token)).await;
        assert!(result.is_err(), "{case}: accepted");
        assert_error(result, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn the_server_refuses_to_start_without_a_way_to_authenticate(pool: PgPool) {
    let nothing = AuthSettings {
        hs256_secret: None,
        ..AuthSettings::hs256(SECRET)
    };
    let settings = test_settings(nothing);
    let error = Application::build(settings.clone(), database_for(&pool, &settings))
        .await
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("no way to authenticate callers"),
        "{error}"
    );

    let empty_secret = test_settings(AuthSettings::hs256(""));
    assert!(
        Application::build(empty_secret.clone(), database_for(&pool, &empty_secret))
            .await
            .is_err()
    );

    let missing_key = test_settings(public_key_auth("no-such-key.pem"));
    assert!(
        Application::build(missing_key.clone(), database_for(&pool, &missing_key))
            .await
            .is_err()
    );
}

#[sqlx::test]
async fn a_short_shared_secret_is_accepted_with_a_warning(pool: PgPool) {
    let app = spawn_app_with(&pool, AuthSettings::hs256("secret")).await;
    let mailbox = seed(&pool).await;
    let token = sign_hs256(&json!({ "org_id": ORG, "exp": now() + 3600 }), "secret");

    let identity = assign_with(&app, with_bearer(request(&mailbox), &token))
        .await
        .expect("accepted");
    assert_eq!(identity.organization_id, ORG);
}

#[sqlx::test]
async fn metadata_that_is_not_text_is_refused_cleanly(pool: PgPool) {
    let auth = AuthSettings {
        trusted_header: true,
        ..AuthSettings::hs256(SECRET)
    };
    let app = spawn_app_with(&pool, auth).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;
    let invalid_utf8: &[u8] = b"Bearer \xff\xfe\x80token";

    let mut call = Request::new(request(&mailbox));
    call.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from(invalid_utf8).unwrap(),
    );
    assert_error(
        assign_with(&app, call).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );

    let mut call = Request::new(request(&mailbox));
    call.metadata_mut().insert(
        "x-organization-id",
        tonic::metadata::MetadataValue::try_from(&b"org_\xff"[..]).unwrap(),
    );
    assert_error(
        assign_with(&app, call).await,
        Code::PermissionDenied,
        "ORGANIZATION_ID_MISSING",
    );
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn asymmetric_tokens_are_held_to_the_same_claims(pool: PgPool) {
    let app = spawn_app_with(&pool, public_key_auth("es256-public.pem")).await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;
    let sign =
        |claims: serde_json::Value| sign_with_pem(Algorithm::ES256, "es256-private.pem", &claims);

    for (case, token) in [
        ("expired", sign(json!({ "org_id": ORG, "exp": now() - 60 }))),
        ("no exp", sign(json!({ "org_id": ORG }))),
        (
            "nbf in the future",
            sign(json!({ "org_id": ORG, "exp": now() + 3600, "nbf": now() + 600 })),
        ),
        (
            "huge",
            sign(json!({ "org_id": ORG, "exp": now() + 3600, "pad": "x".repeat(10_000) })),
        ),
    ] {
        let result = assign_with(&app, with_bearer(request(&mailbox), &token)).await;
        assert!(result.is_err(), "{case}: accepted");
        assert_error(result, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    let no_org = sign(json!({ "exp": now() + 3600 }));
    assert_error(
        assign_with(&app, with_bearer(request(&mailbox), &no_org)).await,
        Code::PermissionDenied,
        "ORGANIZATION_ID_MISSING",
    );
    assert_eq!(snapshot(&pool).await, before);
}

/// `good` with `changes` applied: a `null` removes the claim.
fn claims_with(good: &serde_json::Value, changes: serde_json::Value) -> serde_json::Value {
    let mut claims = good.clone();
    for (name, value) in changes.as_object().expect("an object") {
        match value {
            serde_json::Value::Null => claims.as_object_mut().unwrap().remove(name),
            _ => claims
                .as_object_mut()
                .unwrap()
                .insert(name.clone(), value.clone()),
        };
    }
    claims
}

/// A token with any header and payload JSON, HS256-signed with `secret`.
fn signed_raw(header: &str, payload: &[u8], secret: &str) -> String {
    use hmac::Mac as _;
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signed.as_bytes());
    format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// Every refusal names what failed, with the contract's code and reason, and
/// never echoes the token or a key.
#[sqlx::test]
async fn refusals_name_what_failed(pool: PgPool) {
    let issuer = "https://idp.example";
    let audience = "channel-assignment";
    let strict = spawn_app_with(
        &pool,
        AuthSettings {
            issuer: Some(issuer.into()),
            audience: Some(audience.into()),
            public_key_file: Some(fixture("rsa-public.pem")),
            ..AuthSettings::hs256(SECRET)
        },
    )
    .await;
    let only_rsa = spawn_app_with(&pool, public_key_auth("rsa-public.pem")).await;
    let only_secret = spawn_app(&pool).await;
    let gateway = spawn_app_with(
        &pool,
        AuthSettings {
            trusted_header: true,
            ..AuthSettings::hs256(SECRET)
        },
    )
    .await;
    let mailbox = seed(&pool).await;
    let before = snapshot(&pool).await;
    let good = json!({ "org_id": ORG, "exp": now() + 3600, "iss": issuer, "aud": audience });
    let hs256 = |changes: serde_json::Value| sign_hs256(&claims_with(&good, changes), SECRET);
    let hs384 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS384),
        &good,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let bearer = |token: &str| vec![("authorization", format!("Bearer {token}").into_bytes())];
    const ORG_RULE: &str = "1-64 ASCII letters, digits, '_' or '-'";

    let unauthenticated = |message: &str| {
        (
            Code::Unauthenticated,
            "UNAUTHENTICATED",
            format!("unauthenticated: {message}"),
        )
    };
    let permission_denied = |message: &str| {
        (
            Code::PermissionDenied,
            "ORGANIZATION_ID_MISSING",
            message.to_owned(),
        )
    };
    type Metadata = Vec<(&'static str, Vec<u8>)>;
    type Expected = (Code, &'static str, String);
    let cases: Vec<(&str, &TestApp, Metadata, Expected)> = vec![
        (
            "no credentials",
            &strict,
            vec![],
            unauthenticated("missing bearer token"),
        ),
        (
            "two authorization headers",
            &strict,
            [bearer(&hs256(json!({}))), bearer(&hs256(json!({})))].concat(),
            unauthenticated("more than one authorization header"),
        ),
        (
            "authorization that is not text",
            &strict,
            vec![("authorization", b"Bearer \xff\xfe".to_vec())],
            unauthenticated("malformed authorization header"),
        ),
        (
            "basic scheme",
            &strict,
            vec![("authorization", b"Basic dXNlcjpwYXNz".to_vec())],
            unauthenticated("authorization must be 'Bearer <token>'"),
        ),
        (
            "two parts",
            &strict,
            bearer("abc.def"),
            unauthenticated("malformed token: a JWT is three base64url parts separated by dots"),
        ),
        (
            "a header that is not JSON",
            &strict,
            bearer("not.a.jwt"),
            unauthenticated(
                "malformed token header: not base64url JSON with a string alg (and kid)",
            ),
        ),
        (
            "alg none",
            &strict,
            bearer(&unsigned_token(&good)),
            unauthenticated("token algorithm 'none' is not accepted: the token is unsigned"),
        ),
        (
            "an unknown alg",
            &strict,
            bearer(&signed_raw(
                r#"{"alg":"HS1024","typ":"JWT"}"#,
                good.to_string().as_bytes(),
                SECRET,
            )),
            unauthenticated("token algorithm is not one this service knows"),
        ),
        (
            "HS384",
            &strict,
            bearer(&hs384),
            unauthenticated("token algorithm not accepted: shared-secret tokens must be HS256"),
        ),
        (
            "HS256 without a secret configured",
            &only_rsa,
            bearer(&hs256_token(ORG)),
            unauthenticated("HS256 tokens are not accepted here: no shared secret is configured"),
        ),
        (
            "ES256 without a public key configured",
            &only_secret,
            bearer(&sign_with_pem(Algorithm::ES256, "es256-private.pem", &good)),
            unauthenticated(
                "asymmetric tokens are not accepted here: no public key or JWKS is configured",
            ),
        ),
        (
            "ES256 against an RSA key",
            &strict,
            bearer(&sign_with_pem(Algorithm::ES256, "es256-private.pem", &good)),
            unauthenticated("token algorithm does not match its key"),
        ),
        (
            "HS256 signed with another secret",
            &strict,
            bearer(&sign_hs256(&good, "some-other-secret-0123456789abcdef")),
            unauthenticated("bad token signature"),
        ),
        (
            "RS256 signed with another key",
            &strict,
            bearer(&sign_with_pem(
                Algorithm::RS256,
                "rsa-other-private.pem",
                &good,
            )),
            unauthenticated("bad token signature"),
        ),
        (
            "a signature that is not base64url",
            &strict,
            bearer(&format!(
                "{}!!!",
                hs256(json!({})).rsplit_once('.').unwrap().0.to_owned() + "."
            )),
            unauthenticated("malformed token: not base64url"),
        ),
        (
            "claims that are not a JSON object",
            &strict,
            bearer(&signed_raw(
                r#"{"alg":"HS256","typ":"JWT"}"#,
                b"[1, 2, 3]",
                SECRET,
            )),
            unauthenticated("malformed token claims: not a JSON object"),
        ),
        (
            "expired",
            &strict,
            bearer(&hs256(json!({ "exp": now() - 60 }))),
            unauthenticated("token expired"),
        ),
        (
            "not yet valid",
            &strict,
            bearer(&hs256(json!({ "nbf": now() + 600 }))),
            unauthenticated("token not yet valid (nbf)"),
        ),
        (
            "nbf that is not a number",
            &strict,
            bearer(&hs256(json!({ "nbf": "soon" }))),
            unauthenticated("token nbf claim is not a number"),
        ),
        (
            "no exp",
            &strict,
            bearer(&hs256(json!({ "exp": null }))),
            unauthenticated("token has no numeric exp claim, which is required"),
        ),
        (
            "exp that is not a number",
            &strict,
            bearer(&hs256(json!({ "exp": "tomorrow" }))),
            unauthenticated("token has no numeric exp claim, which is required"),
        ),
        (
            "wrong issuer",
            &strict,
            bearer(&hs256(json!({ "iss": "https://evil.example" }))),
            unauthenticated("wrong token issuer"),
        ),
        (
            "no issuer",
            &strict,
            bearer(&hs256(json!({ "iss": null }))),
            unauthenticated("token has no iss claim, which is required here"),
        ),
        (
            "wrong audience",
            &strict,
            bearer(&hs256(json!({ "aud": "someone-else" }))),
            unauthenticated("wrong token audience"),
        ),
        (
            "no audience",
            &strict,
            bearer(&hs256(json!({ "aud": null }))),
            unauthenticated("token has no aud claim, which is required here"),
        ),
        (
            "too long",
            &strict,
            bearer(&hs256(json!({ "pad": "x".repeat(10_000) }))),
            unauthenticated("token longer than 8192 bytes"),
        ),
        (
            "no org_id",
            &strict,
            bearer(&hs256(json!({ "org_id": null }))),
            permission_denied("the token carries no organization id (org_id claim)"),
        ),
        (
            "org_id that is not a string",
            &strict,
            bearer(&hs256(json!({ "org_id": 42 }))),
            permission_denied("the token's org_id is not a string"),
        ),
        (
            "a malformed org_id",
            &strict,
            bearer(&hs256(json!({ "org_id": "bad org!" }))),
            permission_denied(&format!(
                "the token's org_id is not an organization id: {ORG_RULE}"
            )),
        ),
        (
            "a malformed x-organization-id",
            &gateway,
            vec![("x-organization-id", b"bad!".to_vec())],
            permission_denied(&format!(
                "x-organization-id is not an organization id: {ORG_RULE}"
            )),
        ),
        (
            "two x-organization-id headers",
            &gateway,
            vec![
                ("x-organization-id", ORG.as_bytes().to_vec()),
                ("x-organization-id", ORG.as_bytes().to_vec()),
            ],
            permission_denied("more than one x-organization-id header"),
        ),
        (
            "x-organization-id and a token of another organization",
            &gateway,
            [
                vec![("x-organization-id", ORG.as_bytes().to_vec())],
                bearer(&hs256_token(OTHER_ORG)),
            ]
            .concat(),
            permission_denied("the bearer token names another organization than x-organization-id"),
        ),
    ];

    for (case, app, metadata, (code, reason, message)) in cases {
        let mut call = Request::new(request(&mailbox));
        for (key, value) in &metadata {
            call.metadata_mut().append(
                *key,
                tonic::metadata::MetadataValue::try_from(value.as_slice()).unwrap(),
            );
        }
        let result = assign_with(app, call).await;
        assert!(result.is_err(), "{case}: accepted");
        let status = assert_error(result, code, reason);
        assert_eq!(status.message(), message, "{case}");
        // Nothing the caller sent, and no key, comes back.
        for (_, value) in &metadata {
            let sent = String::from_utf8_lossy(value);
            let token = sent.strip_prefix("Bearer ").unwrap_or(&sent);
            if token.len() > 8 {
                assert!(
                    !status.message().contains(token),
                    "{case}: echoes the token"
                );
                for part in token.split('.').filter(|part| part.len() > 8) {
                    assert!(!status.message().contains(part), "{case}: echoes a part");
                }
            }
        }
        assert!(
            !status.message().contains(SECRET),
            "{case}: names the secret"
        );
    }
    assert_eq!(snapshot(&pool).await, before);
}

/// The `token` command of the real binary, with only `env` set.
async fn run_token(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_channel-assignment"))
        .arg("token")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("runs")
}

#[tokio::test]
async fn token_refuses_what_the_server_would_refuse_with_one_line() {
    let long_scope = "s".repeat(9000);
    let long_organization = "o".repeat(65);
    // (case, arguments, environment, the reason on stderr)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 6] = [
        (
            "a malformed organization id",
            vec!["--org-id", "bad org!"],
            vec![("AUTH_JWT_HS256_SECRET", SECRET)],
            "--org-id \"bad org!\" is not an organization id the server accepts: \
             1-64 ASCII letters, digits, '_' or '-'",
        ),
        (
            "an organization id too long",
            vec!["--org-id", &long_organization],
            vec![("AUTH_JWT_HS256_SECRET", SECRET)],
            "is not an organization id the server accepts",
        ),
        (
            "an empty secret",
            vec!["--org-id", ORG],
            vec![("AUTH_JWT_HS256_SECRET", "")],
            "AUTH_JWT_HS256_SECRET is empty",
        ),
        (
            "no secret",
            vec!["--org-id", ORG],
            vec![],
            "AUTH_JWT_HS256_SECRET (or --auth-jwt-hs256-secret) is required",
        ),
        (
            "a zero lifetime",
            vec!["--org-id", ORG, "--ttl", "0s"],
            vec![("AUTH_JWT_HS256_SECRET", SECRET)],
            "--ttl 0s makes a token that is expired at once",
        ),
        (
            "a token longer than the server reads",
            vec!["--org-id", ORG, "--scope", &long_scope],
            vec![("AUTH_JWT_HS256_SECRET", SECRET)],
            "the server refuses tokens longer than 8192",
        ),
    ];
    for (case, args, env, reason) in cases {
        let output = run_token(&args, &env).await;
        assert_eq!(output.status.code(), Some(1), "{case}");
        assert!(output.stdout.is_empty(), "{case}: printed a token");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{case}: one line: {stderr}");
        assert!(
            lines[0].starts_with("channel-assignment: ") && lines[0].contains(reason),
            "{case}: {stderr}"
        );
        if let Some((_, secret)) = env.first()
            && !secret.is_empty()
        {
            assert!(!stderr.contains(secret), "{case}: names the secret");
        }
    }
}

#[sqlx::test]
async fn the_server_accepts_what_token_prints(pool: PgPool) {
    // A short secret: printed with a warning, as the server starts with one.
    let short = "abc";
    let output = run_token(
        &["--org-id", ORG, "--scope", "channels.inventory"],
        &[("AUTH_JWT_HS256_SECRET", short)],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "channel-assignment: warning: AUTH_JWT_HS256_SECRET is 3 bytes long, shorter than \
         the 32 bytes RFC 7518 asks of an HS256 key"
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let app = spawn_app_with(&pool, AuthSettings::hs256(short)).await;
    let mailbox = seed(&pool).await;
    assign_with(&app, with_bearer(request(&mailbox), token.trim()))
        .await
        .expect("the server takes the printed token");

    // Issuer and audience come from the same variables the server reads.
    let env = [
        ("AUTH_JWT_HS256_SECRET", SECRET),
        ("AUTH_JWT_ISSUER", "https://idp.example"),
        ("AUTH_JWT_AUDIENCE", "channel-assignment"),
    ];
    let output = run_token(&["--org-id", ORG, "--ttl", "5m"], &env).await;
    assert!(output.status.success(), "{output:?}");
    assert!(output.stderr.is_empty(), "no warning for a long secret");
    let token = String::from_utf8(output.stdout).unwrap();
    let strict = spawn_app_with(
        &pool,
        AuthSettings {
            issuer: Some("https://idp.example".into()),
            audience: Some("channel-assignment".into()),
            ..AuthSettings::hs256(SECRET)
        },
    )
    .await;
    let identity = assign_with(&strict, with_bearer(request(&mailbox), token.trim()))
        .await
        .expect("accepted with issuer and audience");
    assert_eq!(identity.organization_id, ORG);
}

/// Each command lists the flags it uses, and only those.
#[tokio::test]
async fn each_command_lists_only_its_flags() {
    let help = |command: &'static str| async move {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_channel-assignment"))
            .args([command, "--help"])
            .env_clear()
            .output()
            .await
            .expect("runs");
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    let flags = |text: &str| -> Vec<String> {
        let mut flags: Vec<String> = text
            .split_whitespace()
            .filter(|word| word.starts_with("--") && word.len() > 2)
            .map(|word| word.trim_end_matches([',', '.', ')']).to_owned())
            .collect();
        flags.sort();
        flags.dedup();
        flags
    };

    assert_eq!(
        flags(&help("token").await),
        [
            "--auth-jwt-audience",
            "--auth-jwt-hs256-secret",
            "--auth-jwt-issuer",
            "--help",
            "--org-id",
            "--scope",
            "--ttl"
        ]
    );
    assert_eq!(
        flags(&help("migrate").await),
        [
            "--app-role",
            "--database-acquire-timeout",
            "--database-url",
            "--help",
            "--log-format"
        ]
    );
    let serve = help("serve").await;
    for flag in [
        "--auth-jwks-url",
        "--auth-jwks-file",
        "--auth-jwks-refresh-interval",
        "--auth-jwks-min-refresh-interval",
        "--log-format",
        "--otlp-endpoint",
        "--database-max-connections",
    ] {
        assert!(
            flags(&serve).iter().any(|f| f == flag),
            "serve lists {flag}"
        );
    }
    // The HS256 secret's rule, as the server and token apply it.
    let rule = format!(
        "under {} bytes",
        channel_assignment::auth::RECOMMENDED_SECRET_LEN
    );
    assert!(serve.contains(&rule), "{serve}");
    assert!(help("token").await.contains(&rule));
}
