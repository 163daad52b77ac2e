//! Minting HS256 tokens: for `dev`, the `token` command and tests. `token`
//! refuses what the server would refuse, by the server's own rules.

use std::time::Duration;

use anyhow::Context as _;
use jsonwebtoken::Algorithm;

use super::{MAX_TOKEN_LEN, check_hs256_secret};
use crate::config::TokenSettings;
use crate::domain::OrganizationId;

/// Signs an HS256 token for `organization`, as an identity provider would.
pub fn mint_hs256_token(
    secret: &str,
    organization: &str,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
    scopes: &[String],
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let ttl = i64::try_from(ttl.as_secs()).context("token lifetime is too long")?;
    let mut claims = serde_json::json!({
        "org_id": organization,
        "iat": now,
        "exp": now.checked_add(ttl).context("token lifetime is too long")?,
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

/// What `token` prints: the token, and warnings for stderr.
#[derive(Debug)]
pub struct Minted {
    pub token: String,
    pub warnings: Vec<String>,
}

/// The `token` command: a token the server configured with the same settings
/// accepts, or a one-line reason why it would not.
pub fn token_command(settings: &TokenSettings) -> anyhow::Result<Minted> {
    let secret = settings.hs256_secret.as_deref().context(
        "AUTH_JWT_HS256_SECRET (or --auth-jwt-hs256-secret) is required: \
         the secret the server verifies HS256 tokens with",
    )?;
    let warnings = check_hs256_secret(secret)?.into_iter().collect();
    if OrganizationId::parse(&settings.org_id).is_none() {
        anyhow::bail!(
            "--org-id {:?} is not an organization id the server accepts: 1-{} ASCII letters, \
             digits, '_' or '-'",
            settings.org_id,
            OrganizationId::MAX_LEN
        );
    }
    anyhow::ensure!(
        !settings.ttl.is_zero(),
        "--ttl 0s makes a token that is expired at once"
    );
    let token = mint_hs256_token(
        secret,
        &settings.org_id,
        settings.ttl,
        settings.issuer.as_deref(),
        settings.audience.as_deref(),
        &settings.scope,
    )?;
    anyhow::ensure!(
        token.len() <= MAX_TOKEN_LEN,
        "the token would be {} bytes long, and the server refuses tokens longer than \
         {MAX_TOKEN_LEN}: fewer or shorter scopes",
        token.len()
    );
    Ok(Minted { token, warnings })
}
