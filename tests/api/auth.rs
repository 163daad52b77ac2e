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
