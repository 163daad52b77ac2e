//! Request metadata → the caller's organization.
//!
//! Runs as the `ChannelAssignment` interceptor only, so health checks,
//! reflection and Kubernetes probes need no token.

use std::{fs, path::Path};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use tonic::metadata::MetadataMap;

use crate::config::AuthSettings;
use crate::domain::OrganizationId;
use crate::error::ServiceError;

pub const TRUSTED_ORGANIZATION_HEADER: &str = "x-organization-id";
/// With the trusted header: the caller's scopes, as the gateway passes them.
pub const TRUSTED_SCOPE_HEADER: &str = "x-scope";
/// With the trusted header: the caller's subject (the events' actor).
pub const TRUSTED_SUBJECT_HEADER: &str = "x-subject";
/// The scope `ChannelInventory` needs.
pub const INVENTORY_SCOPE: &str = "channels.inventory";

/// Far above any real token (README, "Authentication"); refuses to spend
/// work on junk. The server's
/// header limit (startup.rs) is larger, so that such a token gets a gRPC
/// UNAUTHENTICATED rather than an HTTP 431.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// RFC 7518 §3.2: an HS256 key of at least the hash's size, 256 bits.
const RECOMMENDED_SECRET_LEN: usize = 32;

/// Bytes of verified tokens remembered (token lengths plus a fixed overhead
/// each): thousands of typical tokens, far more than the callers of one
/// replica hold at a time, however long the tokens are.
const VERIFIED_TOKENS_BYTES: u64 = 4 * 1024 * 1024;
/// A typical token and its entry, to size the cache's table.
const TYPICAL_VERIFIED_TOKEN_BYTES: u64 = 512;

/// A verifier for one key: the algorithms it accepts and the claims it checks.
struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

pub struct Authenticator {
    hs256: Option<Verifier>,
    public_key: Option<Verifier>,
    trusted_header: bool,
    leeway_seconds: u64,
    /// Tokens that passed verification, so that a caller's token, sent again
    /// with each request, costs a lookup instead of parsing and a signature
    /// check (about 10 µs for HS256 on the benchmark machine; an RSA
    /// signature costs far more). Keyed by the whole token: any other byte
    /// string misses and is verified. An entry serves only until the token's
    /// `exp` (plus leeway); after that the token is verified again and
    /// refused as expired. The keys do not change while the process runs, so
    /// a verification stays true for the entry's life. Only tokens that name a
    /// well-formed organization are kept; refusals are never cached.
    verified: quick_cache::sync::Cache<Box<str>, VerifiedToken, TokenBytes>,
}

/// Who is calling: their organization, the OAuth 2 scopes their credentials
/// grant (space-separated, as issued), and the subject, if named.
#[derive(Clone, Debug)]
pub struct Caller {
    pub organization: OrganizationId,
    scope: Box<str>,
    pub subject: Option<Box<str>>,
}

impl Caller {
    /// Whether `wanted` is one of the granted scopes: whole tokens only
    /// (`channels.inventory.read` does not grant `channels.inventory`).
    pub fn has_scope(&self, wanted: &str) -> bool {
        self.scope.split(' ').any(|granted| granted == wanted)
    }
}

#[derive(Clone)]
struct VerifiedToken {
    organization: OrganizationId,
    scope: Box<str>,
    subject: Option<Box<str>>,
    /// Seconds since the Unix epoch, as `exp` is.
    usable_before: u64,
}

/// Weighs a remembered token by its size, so that the cache's memory is
/// bounded in bytes, not in entries.
#[derive(Clone)]
struct TokenBytes;

impl quick_cache::Weighter<Box<str>, VerifiedToken> for TokenBytes {
    fn weight(&self, token: &Box<str>, verified: &VerifiedToken) -> u64 {
        const ENTRY_OVERHEAD: usize = 64;
        let subject = verified.subject.as_deref().map_or(0, str::len);
        (token.len()
            + verified.organization.as_str().len()
            + verified.scope.len()
            + subject
            + ENTRY_OVERHEAD) as u64
    }
}

#[derive(Deserialize)]
struct Claims {
    /// Any JSON value: a number or an object here is a malformed organization
    /// id (403), not an unreadable token (401).
    #[serde(default)]
    org_id: Option<serde_json::Value>,
    /// Required and checked by the verifier; read again only to bound how
    /// long the verification is remembered.
    #[serde(default)]
    exp: Option<serde_json::Value>,
    /// OAuth 2 scopes, space-separated; anything but a string grants none.
    #[serde(default)]
    scope: Option<serde_json::Value>,
    #[serde(default)]
    sub: Option<serde_json::Value>,
}

impl Authenticator {
    /// Refuses settings under which no caller could be authenticated, rather
    /// than serving everyone.
    pub fn from_settings(settings: &AuthSettings) -> anyhow::Result<Self> {
        let hs256 = match settings.hs256_secret.as_deref() {
            None => None,
            Some("") => anyhow::bail!("AUTH_JWT_HS256_SECRET is empty"),
            Some(secret) => {
                if secret.len() < RECOMMENDED_SECRET_LEN {
                    // Refusing would break deployments that share an existing
                    // secret with their identity provider; say it loudly.
                    tracing::warn!(
                        length = secret.len(),
                        "AUTH_JWT_HS256_SECRET is shorter than {RECOMMENDED_SECRET_LEN} bytes, \
                         which RFC 7518 asks of an HS256 key"
                    );
                }
                Some(Verifier {
                    key: DecodingKey::from_secret(secret.as_bytes()),
                    validation: validation(&[Algorithm::HS256], settings),
                })
            }
        };
        let public_key = settings
            .public_key_file
            .as_deref()
            .map(|path| load_public_key(path, settings))
            .transpose()?;
        if hs256.is_none() && public_key.is_none() && !settings.trusted_header {
            anyhow::bail!(
                "no way to authenticate callers is configured: set AUTH_JWT_HS256_SECRET, \
                 AUTH_JWT_PUBLIC_KEY_FILE, or AUTH_TRUSTED_HEADER=true behind a trusted gateway"
            );
        }
        Ok(Self {
            hs256,
            public_key,
            trusted_header: settings.trusted_header,
            leeway_seconds: settings.leeway_seconds,
            verified: quick_cache::sync::Cache::with_weighter(
                (VERIFIED_TOKENS_BYTES / TYPICAL_VERIFIED_TOKEN_BYTES) as usize,
                VERIFIED_TOKENS_BYTES,
                TokenBytes,
            ),
        })
    }

    /// The caller's organization (see `caller`).
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<OrganizationId, ServiceError> {
        self.caller(metadata).map(|caller| caller.organization)
    }

    /// Who is calling, from the bearer token, or from the gateway's headers
    /// when `AUTH_TRUSTED_HEADER` is on and it set `x-organization-id`.
    pub fn caller(&self, metadata: &MetadataMap) -> Result<Caller, ServiceError> {
        if self.trusted_header
            && let Some(organization) = trusted_organization(metadata)?
        {
            // A token beside the header is a second credential: it must be
            // valid and agree, or the request is refused rather than served
            // for whichever one the gateway happened to set.
            let token_caller = if metadata.contains_key("authorization") {
                let token_caller = self.caller_from_token(metadata)?;
                if token_caller.organization != organization {
                    return Err(ServiceError::ConflictingOrganizations);
                }
                Some(token_caller)
            } else {
                None
            };
            // The gateway's word on scopes and subject, as on the organization.
            let subject = header_text(metadata, TRUSTED_SUBJECT_HEADER)
                .map(Into::into)
                .or_else(|| token_caller.and_then(|caller| caller.subject));
            return Ok(Caller {
                organization,
                scope: trusted_scope(metadata).into(),
                subject,
            });
        }
        self.caller_from_token(metadata)
    }

    fn caller_from_token(&self, metadata: &MetadataMap) -> Result<Caller, ServiceError> {
        let token = bearer_token(metadata)?;
        if token.len() > MAX_TOKEN_LEN {
            return Err(ServiceError::Unauthenticated(
                "token longer than 8192 bytes",
            ));
        }
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(verified) = self.verified.get(token)
            && now < verified.usable_before
        {
            return Ok(Caller {
                organization: verified.organization,
                scope: verified.scope,
                subject: verified.subject,
            });
        }
        let claims = self.verify(token)?;
        let organization = match claims.org_id {
            Some(serde_json::Value::String(raw)) => {
                OrganizationId::parse(&raw).ok_or(ServiceError::OrganizationIdMissing)?
            }
            _ => return Err(ServiceError::OrganizationIdMissing),
        };
        let scope: Box<str> = match &claims.scope {
            Some(serde_json::Value::String(scope)) => scope.as_str().into(),
            _ => "".into(),
        };
        let subject: Option<Box<str>> = match &claims.sub {
            Some(serde_json::Value::String(subject)) => Some(subject.as_str().into()),
            _ => None,
        };
        // A fractional or out-of-range `exp` that the verifier accepted is
        // simply not remembered.
        if let Some(exp) = claims.exp.as_ref().and_then(serde_json::Value::as_u64) {
            self.verified.insert(
                token.into(),
                VerifiedToken {
                    organization: organization.clone(),
                    scope: scope.clone(),
                    subject: subject.clone(),
                    usable_before: exp.saturating_add(self.leeway_seconds),
                },
            );
        }
        Ok(Caller {
            organization,
            scope,
            subject,
        })
    }

    fn verify(&self, token: &str) -> Result<Claims, ServiceError> {
        const INVALID: ServiceError = ServiceError::Unauthenticated("invalid token");
        // `alg: none` and unknown algorithms fail here: jsonwebtoken has no
        // such variant.
        let header = jsonwebtoken::decode_header(token).map_err(|_| INVALID)?;
        // The key is chosen by the algorithm's family, so a token cannot make
        // the public key serve as an HMAC secret (algorithm confusion).
        let verifier = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => self.hs256.as_ref(),
            _ => self.public_key.as_ref(),
        }
        .ok_or(INVALID)?;
        jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation)
            .map(|data| data.claims)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => ServiceError::Unauthenticated("token expired"),
                ErrorKind::ImmatureSignature => {
                    ServiceError::Unauthenticated("token not yet valid")
                }
                ErrorKind::InvalidIssuer => ServiceError::Unauthenticated("wrong token issuer"),
                ErrorKind::InvalidAudience => ServiceError::Unauthenticated("wrong token audience"),
                ErrorKind::MissingRequiredClaim(_) => {
                    ServiceError::Unauthenticated("token lacks a required claim")
                }
                _ => INVALID,
            })
    }
}

/// With the trusted header: the scopes the gateway grants, space-separated
/// in one or more `x-scope` headers.
fn trusted_scope(metadata: &MetadataMap) -> String {
    metadata
        .get_all(TRUSTED_SCOPE_HEADER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect::<Vec<_>>()
        .join(" ")
}

fn header_text<'a>(metadata: &'a MetadataMap, name: &str) -> Option<&'a str> {
    metadata
        .get(name)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
}

/// The organization named by the trusted header, if the request has one.
fn trusted_organization(metadata: &MetadataMap) -> Result<Option<OrganizationId>, ServiceError> {
    let mut values = metadata.get_all(TRUSTED_ORGANIZATION_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ServiceError::OrganizationIdMissing);
    }
    value
        .to_str()
        .ok()
        .and_then(OrganizationId::parse)
        .map(Some)
        .ok_or(ServiceError::OrganizationIdMissing)
}

fn bearer_token(metadata: &MetadataMap) -> Result<&str, ServiceError> {
    let mut values = metadata.get_all("authorization").iter();
    let value = values
        .next()
        .ok_or(ServiceError::Unauthenticated("missing bearer token"))?;
    if values.next().is_some() {
        return Err(ServiceError::Unauthenticated(
            "more than one authorization header",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| ServiceError::Unauthenticated("malformed authorization header"))?;
    // The scheme is case-insensitive (RFC 9110 §11.1).
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ServiceError::Unauthenticated(
            "authorization must be 'Bearer <token>'",
        )),
    }
}

fn validation(algorithms: &[Algorithm], settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(algorithms[0]);
    validation.algorithms = algorithms.to_vec();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.leeway = settings.leeway_seconds;
    // jsonwebtoken checks `iss`/`aud` only when present unless they are
    // required: a token without them must not pass a configured check.
    let mut required = vec!["exp"];
    match &settings.issuer {
        Some(issuer) => {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        None => validation.iss = None,
    }
    match &settings.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        // Without a configured audience, a token's `aud` is not checked
        // (jsonwebtoken would otherwise reject every token that has one).
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Reads a PEM public key and accepts the algorithms of its type: RSA keys
/// RS*/PS*, EC keys ES256/ES384, Ed25519 keys EdDSA.
fn load_public_key(path: &Path, settings: &AuthSettings) -> anyhow::Result<Verifier> {
    let pem = fs::read(path)
        .with_context(|| format!("cannot read AUTH_JWT_PUBLIC_KEY_FILE {}", path.display()))?;
    let (key, algorithms): (DecodingKey, &[Algorithm]) =
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            (
                key,
                &[
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
            )
        } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            (key, &[Algorithm::ES256, Algorithm::ES384])
        } else if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
            (key, &[Algorithm::EdDSA])
        } else {
            anyhow::bail!(
                "AUTH_JWT_PUBLIC_KEY_FILE {} is not a PEM RSA, EC or Ed25519 public key",
                path.display()
            );
        };
    Ok(Verifier {
        key,
        validation: validation(algorithms, settings),
    })
}

/// Signs an HS256 token for `organization`, as an identity provider would;
/// for `dev`, the `token` command and tests.
pub fn mint_hs256_token(
    secret: &str,
    organization: &str,
    ttl: std::time::Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
    scopes: &[String],
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let ttl = i64::try_from(ttl.as_secs()).context("token lifetime is too long")?;
    let mut claims = serde_json::json!({
        "org_id": organization,
        "iat": now,
        "exp": now.saturating_add(ttl),
    });
    let scope = scopes
        .iter()
        .flat_map(|scope| scope.split_whitespace())
        .collect::<Vec<_>>()
        .join(" ");
    if !scope.is_empty() {
        claims["scope"] = scope.into();
    }
    if let Some(issuer) = issuer {
        claims["iss"] = issuer.into();
    }
    if let Some(audience) = audience {
        claims["aud"] = audience.into();
    }
    let header = jsonwebtoken::Header::new(Algorithm::HS256);
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tonic::metadata::{MetadataMap, MetadataValue};

    use super::*;

    const SECRET: &str = "property-test-secret-0123456789ab";

    fn authenticator(trusted_header: bool) -> Authenticator {
        Authenticator::from_settings(&AuthSettings {
            trusted_header,
            ..AuthSettings::hs256(SECRET)
        })
        .unwrap()
    }

    fn token(claims: &serde_json::Value) -> String {
        mint(claims, SECRET)
    }

    fn mint(claims: &serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn bearer(token: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
        metadata
    }

    fn refusal_is_in_the_contract(result: &Result<OrganizationId, ServiceError>) -> bool {
        matches!(
            result,
            Ok(_) | Err(ServiceError::Unauthenticated(_) | ServiceError::OrganizationIdMissing)
        )
    }

    proptest! {
        #[test]
        fn arbitrary_metadata_bytes_are_refused_as_the_contract_says(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            header in prop_oneof![Just("authorization"), Just("x-organization-id")],
            trusted in any::<bool>(),
        ) {
            let mut metadata = MetadataMap::new();
            if let Ok(value) = MetadataValue::try_from(bytes.as_slice()) {
                metadata.insert(header, value);
            }
            let result = authenticator(trusted).authenticate(&metadata);
            prop_assert!(refusal_is_in_the_contract(&result), "{result:?}");
            if header == "authorization" {
                prop_assert!(result.is_err(), "random bytes are never a valid token");
            }
        }

        #[test]
        fn arbitrary_bearer_strings_are_unauthenticated(token in ".{0,2000}") {
            let mut metadata = MetadataMap::new();
            if let Ok(value) = MetadataValue::try_from(format!("Bearer {token}").as_bytes()) {
                metadata.insert("authorization", value);
            }
            let result = authenticator(false).authenticate(&metadata);
            prop_assert!(matches!(result, Err(ServiceError::Unauthenticated(_))), "{result:?}");
        }

        /// A correctly signed token names the organization exactly when its
        /// org_id is a string of the documented form; otherwise it is 403.
        #[test]
        fn signed_org_ids_are_taken_only_when_well_formed(
            org_id in prop_oneof![
                "[A-Za-z0-9_-]{1,64}".prop_map(serde_json::Value::from),
                ".{0,80}".prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                Just(serde_json::Value::Null),
                Just(serde_json::json!({"id": "org_1"})),
            ]
        ) {
            let exp = chrono::Utc::now().timestamp() + 600;
            let signed = token(&serde_json::json!({ "org_id": org_id.clone(), "exp": exp }));
            let result = authenticator(false).authenticate(&bearer(&signed));
            let expected = org_id.as_str().and_then(OrganizationId::parse);
            match (result, expected) {
                (Ok(found), Some(expected)) => prop_assert_eq!(found, expected),
                (Err(ServiceError::OrganizationIdMissing), None) => {}
                (other, expected) => prop_assert!(false, "{other:?} for {expected:?}"),
            }
        }

        /// Any change to a signed token's bytes makes it unusable.
        #[test]
        fn a_tampered_token_is_refused(position in any::<prop::sample::Index>(), replacement in "[A-Za-z0-9_-]") {
            let exp = chrono::Utc::now().timestamp() + 600;
            let signed = token(&serde_json::json!({ "org_id": "org_1", "exp": exp }));
            let at = position.index(signed.len());
            let original = &signed[at..=at];
            prop_assume!(original != "." && original != replacement.as_str());
            let tampered = format!("{}{}{}", &signed[..at], replacement, &signed[at + 1..]);
            // The genuine token is remembered first: the copy must still miss.
            let authenticator = authenticator(false);
            prop_assert!(authenticator.authenticate(&bearer(&signed)).is_ok());
            let result = authenticator.authenticate(&bearer(&tampered));
            // Base64url's last character carries spare bits: a change there
            // can decode to the same bytes and still verify.
            if at + 1 != signed.len() {
                prop_assert!(result.is_err(), "tampered at {at}: {result:?}");
            }
        }
    }

    #[test]
    fn only_tokens_that_name_an_organization_are_remembered() {
        let authenticator = authenticator(false);
        let exp = chrono::Utc::now().timestamp() + 600;
        let no_organization = token(&serde_json::json!({ "org_id": 7, "exp": exp }));
        let forged = mint(
            &serde_json::json!({ "org_id": "org_1", "exp": exp }),
            "another-secret-0123456789abcdef",
        );
        for refused in [&no_organization, &forged] {
            for _ in 0..2 {
                assert!(authenticator.authenticate(&bearer(refused)).is_err());
            }
        }
        assert_eq!(authenticator.verified.len(), 0);

        let genuine = token(&serde_json::json!({ "org_id": "org_1", "exp": exp }));
        for _ in 0..2 {
            let organization = authenticator.authenticate(&bearer(&genuine)).unwrap();
            assert_eq!(organization.as_str(), "org_1");
        }
        assert_eq!(authenticator.verified.len(), 1);
    }

    #[test]
    fn remembered_tokens_are_bounded_in_bytes() {
        let authenticator = authenticator(false);
        let exp = chrono::Utc::now().timestamp() + 600;
        let padding = "x".repeat(2048);
        let tokens = 4_000;
        for n in 0..tokens {
            let long = token(
                &serde_json::json!({ "org_id": "org_1", "exp": exp, "n": n, "pad": padding }),
            );
            assert!(authenticator.authenticate(&bearer(&long)).is_ok());
        }
        // More than 8 MB of tokens went through.
        assert!(authenticator.verified.weight() <= VERIFIED_TOKENS_BYTES);
        assert!(authenticator.verified.len() < tokens);
        assert!(!authenticator.verified.is_empty());
    }

    #[test]
    fn a_remembered_token_is_refused_once_it_expires() {
        let authenticator = Authenticator::from_settings(&AuthSettings {
            leeway_seconds: 0,
            ..AuthSettings::hs256(SECRET)
        })
        .unwrap();
        let exp = jsonwebtoken::get_current_timestamp() + 1;
        let short_lived = token(&serde_json::json!({ "org_id": "org_1", "exp": exp }));
        assert!(authenticator.authenticate(&bearer(&short_lived)).is_ok());
        assert_eq!(authenticator.verified.len(), 1);
        while jsonwebtoken::get_current_timestamp() <= exp {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(matches!(
            authenticator.authenticate(&bearer(&short_lived)),
            Err(ServiceError::Unauthenticated("token expired"))
        ));
    }

    #[test]
    fn a_token_signed_with_another_secret_is_refused() {
        let exp = chrono::Utc::now().timestamp() + 600;
        let forged = mint(
            &serde_json::json!({ "org_id": "org_1", "exp": exp }),
            "another-secret-0123456789abcdef",
        );
        assert!(matches!(
            authenticator(false).authenticate(&bearer(&forged)),
            Err(ServiceError::Unauthenticated(_))
        ));
    }
}
