//! Request metadata → the caller's organization.
//!
//! Runs as the `ChannelAssignment` interceptor only, so health checks,
//! reflection and Kubernetes probes need no token.
//!
//! - `keys`: verification keys and the algorithms each accepts.
//! - `jwks`: key sets from `AUTH_JWKS_FILE` / `AUTH_JWKS_URL`, loaded again
//!   in the background (key rotation).
//! - `mint`: HS256 tokens for `dev`, `token` and tests.

mod jwks;
mod keys;
mod mint;

use std::{str::FromStr as _, sync::Arc};

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, errors::ErrorKind};
use serde::Deserialize;
use tokio_util::task::AbortOnDropHandle;
use tonic::metadata::MetadataMap;

use crate::config::AuthSettings;
use crate::domain::OrganizationId;
use crate::error::ServiceError;

pub use jwks::{JWKS_FETCH_TIMEOUT, MAX_JWKS_BYTES};
use jwks::{JwksSource, Origin};
use keys::{ClaimRules, Key};
pub use mint::{Minted, mint_hs256_token, token_command};

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
pub const RECOMMENDED_SECRET_LEN: usize = 32;

/// Bytes of verified tokens remembered (token lengths plus a fixed overhead
/// each): thousands of typical tokens, far more than the callers of one
/// replica hold at a time, however long the tokens are.
const VERIFIED_TOKENS_BYTES: u64 = 4 * 1024 * 1024;
/// A typical token and its entry, to size the cache's table.
const TYPICAL_VERIFIED_TOKEN_BYTES: u64 = 512;

/// The one rule for an HS256 secret, which `serve` and `token` both apply:
/// an empty one is refused; a short one is taken, with the warning returned
/// (refusing would break deployments that share an existing secret with
/// their identity provider).
pub fn check_hs256_secret(secret: &str) -> anyhow::Result<Option<String>> {
    anyhow::ensure!(!secret.is_empty(), "AUTH_JWT_HS256_SECRET is empty");
    Ok((secret.len() < RECOMMENDED_SECRET_LEN).then(|| {
        format!(
            "AUTH_JWT_HS256_SECRET is {} bytes long, shorter than the \
             {RECOMMENDED_SECRET_LEN} bytes RFC 7518 asks of an HS256 key",
            secret.len()
        )
    }))
}

pub struct Authenticator {
    hs256: Option<Arc<Key>>,
    public_key: Option<Arc<Key>>,
    /// `AUTH_JWKS_FILE` and `AUTH_JWKS_URL`, when set: keys chosen by `kid`.
    jwks: Vec<Arc<JwksSource>>,
    trusted_header: bool,
    leeway_seconds: u64,
    /// Tokens that passed verification, so that a caller's token, sent again
    /// with each request, costs a lookup instead of parsing and a signature
    /// check (about 10 µs for HS256 on the benchmark machine; an RSA
    /// signature costs far more). Keyed by the whole token: any other byte
    /// string misses and is verified. An entry serves only until the token's
    /// `exp` (plus leeway), and only while the key that verified it is still
    /// in use: a key that leaves its JWKS is retired at the load that sees it
    /// gone, and the tokens it verified are verified again (and refused).
    /// Only tokens that name a well-formed organization are kept; refusals
    /// are never cached.
    verified: quick_cache::sync::Cache<Box<str>, VerifiedToken, TokenBytes>,
    /// The tasks that load the JWKS again; they end with the authenticator.
    _refreshers: Vec<AbortOnDropHandle<()>>,
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
    /// The key that verified it.
    key: Arc<Key>,
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

/// The token header's fields that choose the key, read before any key is.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// Why a token is refused, as the caller reads it (`unauthenticated: …`):
/// what failed, never the token or a key.
mod refusal {
    pub const NOT_A_JWT: &str = "malformed token: a JWT is three base64url parts separated by dots";
    pub const MALFORMED_HEADER: &str =
        "malformed token header: not base64url JSON with a string alg (and kid)";
    pub const MALFORMED: &str = "malformed token: not base64url";
    pub const MALFORMED_CLAIMS: &str = "malformed token claims: not a JSON object";
    pub const ALG_NONE: &str = "token algorithm 'none' is not accepted: the token is unsigned";
    pub const ALG_UNKNOWN: &str = "token algorithm is not one this service knows";
    pub const HMAC_NOT_HS256: &str =
        "token algorithm not accepted: shared-secret tokens must be HS256";
    pub const NO_SECRET: &str =
        "HS256 tokens are not accepted here: no shared secret is configured";
    pub const NO_PUBLIC_KEY: &str =
        "asymmetric tokens are not accepted here: no public key or JWKS is configured";
    pub const UNKNOWN_KID: &str = "unknown key id (kid): no key of the JWKS has it";
    pub const KID_MISSING: &str =
        "token has no key id (kid), which is needed to choose among the JWKS keys";
    pub const ALG_NOT_FOR_KEY: &str = "token algorithm does not match its key";
    pub const NO_KEY_FOR_ALG: &str = "no configured key takes the token's algorithm";
    pub const BAD_SIGNATURE: &str = "bad token signature";
    pub const EXPIRED: &str = "token expired";
    pub const NOT_YET_VALID: &str = "token not yet valid (nbf)";
    pub const WRONG_ISSUER: &str = "wrong token issuer";
    pub const WRONG_AUDIENCE: &str = "wrong token audience";
    pub const NO_EXP: &str = "token has no numeric exp claim, which is required";
    pub const NO_ISS: &str = "token has no iss claim, which is required here";
    pub const NO_AUD: &str = "token has no aud claim, which is required here";
    pub const MALFORMED_NBF: &str = "token nbf claim is not a number";
    pub const UNVERIFIABLE: &str = "token could not be verified";
    pub const TOO_LONG: &str = "token longer than 8192 bytes";
    const _: () = assert!(super::MAX_TOKEN_LEN == 8192, "TOO_LONG names the limit");
}

impl Authenticator {
    /// Checks the settings, loads every key (fetching `AUTH_JWKS_URL` once)
    /// and starts loading the JWKS again in the background. Refuses settings
    /// under which no caller could be authenticated, rather than serving
    /// everyone, and a JWKS that cannot be loaded at start.
    pub async fn start(settings: &AuthSettings) -> anyhow::Result<Self> {
        let rules = ClaimRules::from_settings(settings);
        if settings.jwks_url.is_some() || settings.jwks_file.is_some() {
            anyhow::ensure!(
                !settings.jwks_refresh_interval.is_zero()
                    && !settings.jwks_min_refresh_interval.is_zero(),
                "AUTH_JWKS_REFRESH_INTERVAL and AUTH_JWKS_MIN_REFRESH_INTERVAL must be longer \
                 than 0s"
            );
        }
        let mut origins = Vec::new();
        if let Some(path) = &settings.jwks_file {
            origins.push(Origin::File(path.clone()));
        }
        if let Some(url) = &settings.jwks_url {
            if url.scheme() != "https" && !is_loopback(url) {
                tracing::warn!(
                    url = %url,
                    "AUTH_JWKS_URL is plain HTTP: whoever can change it in transit can mint tokens"
                );
            }
            origins.push(Origin::url(url)?);
        }
        let mut jwks = Vec::new();
        for origin in origins {
            jwks.push(Arc::new(JwksSource::load(origin, rules.clone()).await?));
        }
        let refreshers = jwks
            .iter()
            .map(|source| {
                Arc::clone(source).refresh_in_background(
                    settings.jwks_refresh_interval,
                    settings.jwks_min_refresh_interval,
                )
            })
            .collect();
        Self::assemble(settings, rules, jwks, refreshers)
    }

    /// As `start`, without a runtime: for settings without `AUTH_JWKS_URL`
    /// and `AUTH_JWKS_FILE` (unit tests, fuzzing).
    pub fn from_settings(settings: &AuthSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            settings.jwks_url.is_none() && settings.jwks_file.is_none(),
            "a JWKS is loaded by Authenticator::start"
        );
        Self::assemble(
            settings,
            ClaimRules::from_settings(settings),
            Vec::new(),
            Vec::new(),
        )
    }

    fn assemble(
        settings: &AuthSettings,
        rules: ClaimRules,
        jwks: Vec<Arc<JwksSource>>,
        refreshers: Vec<AbortOnDropHandle<()>>,
    ) -> anyhow::Result<Self> {
        let hs256 = match settings.hs256_secret.as_deref() {
            None => None,
            Some(secret) => {
                if let Some(warning) = check_hs256_secret(secret)? {
                    tracing::warn!("{warning}");
                }
                Some(Arc::new(Key::hs256(secret, &rules)))
            }
        };
        let public_key = match settings.public_key_file.as_deref() {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| {
                    format!("cannot read AUTH_JWT_PUBLIC_KEY_FILE {}", path.display())
                })?;
                let key = Key::from_pem(&pem, &rules).with_context(|| {
                    format!(
                        "AUTH_JWT_PUBLIC_KEY_FILE {} is not a PEM RSA, EC or Ed25519 public key",
                        path.display()
                    )
                })?;
                Some(Arc::new(key))
            }
        };
        if hs256.is_none() && public_key.is_none() && jwks.is_empty() && !settings.trusted_header {
            anyhow::bail!(
                "no way to authenticate callers is configured: set AUTH_JWT_HS256_SECRET, \
                 AUTH_JWT_PUBLIC_KEY_FILE, AUTH_JWKS_URL, AUTH_JWKS_FILE, or \
                 AUTH_TRUSTED_HEADER=true behind a trusted gateway"
            );
        }
        Ok(Self {
            hs256,
            public_key,
            jwks,
            trusted_header: settings.trusted_header,
            leeway_seconds: settings.leeway_seconds,
            verified: quick_cache::sync::Cache::with_weighter(
                (VERIFIED_TOKENS_BYTES / TYPICAL_VERIFIED_TOKEN_BYTES) as usize,
                VERIFIED_TOKENS_BYTES,
                TokenBytes,
            ),
            _refreshers: refreshers,
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
            return Err(ServiceError::Unauthenticated(refusal::TOO_LONG));
        }
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(verified) = self.verified.get(token) {
            if now < verified.usable_before && !verified.key.is_retired() {
                return Ok(Caller {
                    organization: verified.organization,
                    scope: verified.scope,
                    subject: verified.subject,
                });
            }
            self.verified.remove(token);
        }
        let (claims, key) = self.verify(token).map_err(ServiceError::Unauthenticated)?;
        let organization = match claims.org_id {
            Some(serde_json::Value::String(raw)) => {
                OrganizationId::parse(&raw).ok_or(ServiceError::OrganizationIdMissing(
                    "the token's org_id is not an organization id: 1-64 ASCII letters, \
                     digits, '_' or '-'",
                ))?
            }
            None | Some(serde_json::Value::Null) => {
                return Err(ServiceError::OrganizationIdMissing(
                    "the token carries no organization id (org_id claim)",
                ));
            }
            Some(_) => {
                return Err(ServiceError::OrganizationIdMissing(
                    "the token's org_id is not a string",
                ));
            }
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
                    key,
                },
            );
        }
        Ok(Caller {
            organization,
            scope,
            subject,
        })
    }

    /// The token's claims and the key that verified them, or what failed.
    fn verify(&self, token: &str) -> Result<(Claims, Arc<Key>), &'static str> {
        let header = read_header(token)?;
        // `none` and names jsonwebtoken does not know have no variant.
        if header.alg.eq_ignore_ascii_case("none") {
            return Err(refusal::ALG_NONE);
        }
        let algorithm = Algorithm::from_str(&header.alg).map_err(|_| refusal::ALG_UNKNOWN)?;
        // The key is chosen by the algorithm's family first, so a token
        // cannot make a public key serve as an HMAC secret (algorithm
        // confusion); a `kid` only chooses among public keys.
        let key = match algorithm {
            Algorithm::HS256 => self.hs256.clone().ok_or(refusal::NO_SECRET)?,
            Algorithm::HS384 | Algorithm::HS512 => return Err(refusal::HMAC_NOT_HS256),
            _ => self.public_key_for(algorithm, header.kid.as_deref())?,
        };
        if !key.accepts(algorithm) {
            return Err(refusal::ALG_NOT_FOR_KEY);
        }
        let claims = key
            .decode::<Claims>(token)
            .map_err(|error| refusal_of(&error))?;
        Ok((claims, key))
    }

    /// The public key for an asymmetric token: the JWKS key of its `kid`
    /// when a JWKS is configured and the token names one; else the PEM key;
    /// else the one JWKS key that takes its algorithm.
    fn public_key_for(
        &self,
        algorithm: Algorithm,
        kid: Option<&str>,
    ) -> Result<Arc<Key>, &'static str> {
        if let Some(kid) = kid
            && !self.jwks.is_empty()
        {
            let named: Vec<Arc<Key>> = self.jwks.iter().flat_map(|set| set.find(kid)).collect();
            if named.is_empty() {
                // Perhaps a key the identity provider has just added.
                for set in &self.jwks {
                    set.request_refresh();
                }
                return Err(refusal::UNKNOWN_KID);
            }
            return named
                .into_iter()
                .find(|key| key.accepts(algorithm))
                .ok_or(refusal::ALG_NOT_FOR_KEY);
        }
        if let Some(key) = &self.public_key {
            return Ok(Arc::clone(key));
        }
        if self.jwks.is_empty() {
            return Err(refusal::NO_PUBLIC_KEY);
        }
        let mut candidates = self.jwks.iter().flat_map(|set| set.accepting(algorithm));
        match (candidates.next(), candidates.next()) {
            (Some(only), None) => Ok(only),
            (Some(_), Some(_)) => Err(refusal::KID_MISSING),
            (None, _) => Err(refusal::NO_KEY_FOR_ALG),
        }
    }
}

fn read_header(token: &str) -> Result<Header, &'static str> {
    let mut parts = token.split('.');
    let (Some(header), Some(_claims), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refusal::NOT_A_JWT);
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| refusal::MALFORMED_HEADER)?;
    serde_json::from_slice(&json).map_err(|_| refusal::MALFORMED_HEADER)
}

/// What a refusal by the verifier means to the caller.
fn refusal_of(error: &jsonwebtoken::errors::Error) -> &'static str {
    match error.kind() {
        ErrorKind::InvalidSignature => refusal::BAD_SIGNATURE,
        ErrorKind::ExpiredSignature => refusal::EXPIRED,
        ErrorKind::ImmatureSignature => refusal::NOT_YET_VALID,
        ErrorKind::InvalidIssuer => refusal::WRONG_ISSUER,
        ErrorKind::InvalidAudience => refusal::WRONG_AUDIENCE,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "iss" => refusal::NO_ISS,
            "aud" => refusal::NO_AUD,
            _ => refusal::NO_EXP,
        },
        ErrorKind::InvalidClaimFormat(claim) if claim == "nbf" => refusal::MALFORMED_NBF,
        ErrorKind::InvalidClaimFormat(_) => refusal::NO_EXP,
        ErrorKind::InvalidAlgorithm => refusal::ALG_NOT_FOR_KEY,
        ErrorKind::Base64(_) => refusal::MALFORMED,
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => refusal::MALFORMED_CLAIMS,
        _ => refusal::UNVERIFIABLE,
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(address)) => address.is_loopback(),
        Some(url::Host::Ipv6(address)) => address.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
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
        return Err(ServiceError::OrganizationIdMissing(
            "more than one x-organization-id header",
        ));
    }
    value
        .to_str()
        .ok()
        .and_then(OrganizationId::parse)
        .map(Some)
        .ok_or(ServiceError::OrganizationIdMissing(
            "x-organization-id is not an organization id: 1-64 ASCII letters, digits, \
             '_' or '-'",
        ))
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
            Ok(_) | Err(ServiceError::Unauthenticated(_) | ServiceError::OrganizationIdMissing(_))
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
                (Err(ServiceError::OrganizationIdMissing(_)), None) => {}
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
