//! Verification keys, and the algorithms each one accepts.
//!
//! A key accepts only the algorithms of its own family (an HMAC secret HS256,
//! an RSA key RS*/PS*, an EC key the ES* of its curve, an Ed25519 key EdDSA),
//! so a token can never have a public key's bytes used as an HMAC secret
//! (algorithm confusion): the family is the key's, never the token's.

use std::sync::atomic::{AtomicBool, Ordering};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::DeserializeOwned;

use crate::config::AuthSettings;

pub(super) const RSA_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The claim checks every key applies, from the settings.
#[derive(Clone, Debug)]
pub(super) struct ClaimRules {
    issuer: Option<String>,
    audience: Option<String>,
    leeway_seconds: u64,
}

impl ClaimRules {
    pub(super) fn from_settings(settings: &AuthSettings) -> Self {
        Self {
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway_seconds: settings.leeway_seconds,
        }
    }

    fn validation(&self, algorithms: &[Algorithm]) -> Validation {
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.to_vec();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = self.leeway_seconds;
        // jsonwebtoken checks `iss`/`aud` only when present unless they are
        // required: a token without them must not pass a configured check.
        let mut required = vec!["exp"];
        match &self.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
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
}

/// One key that verifies tokens, with the algorithms it accepts.
pub(super) struct Key {
    /// The JWK it came from (a JWKS key), to recognise it in the next
    /// version of the set; `None` for the shared secret and the PEM key.
    jwk: Option<Jwk>,
    key: DecodingKey,
    validation: Validation,
    /// Set once the key has left its JWKS: tokens it verified, remembered
    /// by the authenticator, are verified again (and refused).
    retired: AtomicBool,
}

impl Key {
    pub(super) fn hs256(secret: &str, rules: &ClaimRules) -> Self {
        Self::new(
            None,
            DecodingKey::from_secret(secret.as_bytes()),
            rules.validation(&[Algorithm::HS256]),
        )
    }

    /// A PEM public key: RSA keys take RS*/PS*, EC keys ES256/ES384, Ed25519
    /// keys EdDSA. `None` when the bytes are none of these.
    pub(super) fn from_pem(pem: &[u8], rules: &ClaimRules) -> Option<Self> {
        let (key, algorithms): (DecodingKey, &[Algorithm]) =
            if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
                (key, RSA_ALGORITHMS)
            } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
                (key, &[Algorithm::ES256, Algorithm::ES384])
            } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
                (key, &[Algorithm::EdDSA])
            } else {
                return None;
            };
        Some(Self::new(None, key, rules.validation(algorithms)))
    }

    /// A JWKS key, or why it cannot verify tokens here. Its `alg`, when
    /// present, must be of its key type's family and is then the only
    /// algorithm it accepts.
    pub(super) fn from_jwk(jwk: &Jwk, rules: &ClaimRules) -> Result<Self, &'static str> {
        if matches!(&jwk.common.public_key_use, Some(usage) if *usage != PublicKeyUse::Signature) {
            return Err("not a signature key (use)");
        }
        if let Some(operations) = &jwk.common.key_operations
            && !operations.contains(&KeyOperations::Verify)
        {
            return Err("not a verification key (key_ops)");
        }
        let family: &[Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA_ALGORITHMS,
            AlgorithmParameters::EllipticCurve(params) => match params.curve {
                EllipticCurve::P256 => &[Algorithm::ES256],
                EllipticCurve::P384 => &[Algorithm::ES384],
                _ => return Err("an elliptic curve this service does not verify (crv)"),
            },
            AlgorithmParameters::OctetKeyPair(params) => match params.curve {
                EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
                _ => return Err("an OKP curve this service does not verify (crv)"),
            },
            AlgorithmParameters::OctetKey(_) => {
                return Err("a symmetric (oct) key: HS256 tokens are verified with \
                            AUTH_JWT_HS256_SECRET only");
            }
            _ => return Err("a key type this service does not verify (kty)"),
        };
        let algorithms = match jwk.common.key_algorithm {
            None => family.to_vec(),
            Some(declared) => match Algorithm::try_from(declared) {
                Ok(algorithm) if family.contains(&algorithm) => vec![algorithm],
                _ => return Err("its alg does not belong to its key type"),
            },
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|_| "malformed key parameters")?;
        Ok(Self::new(
            Some(jwk.clone()),
            key,
            rules.validation(&algorithms),
        ))
    }

    fn new(jwk: Option<Jwk>, key: DecodingKey, validation: Validation) -> Self {
        Self {
            jwk,
            key,
            validation,
            retired: AtomicBool::new(false),
        }
    }

    pub(super) fn kid(&self) -> Option<&str> {
        self.jwk
            .as_ref()
            .and_then(|jwk| jwk.common.key_id.as_deref())
    }

    pub(super) fn jwk(&self) -> Option<&Jwk> {
        self.jwk.as_ref()
    }

    pub(super) fn accepts(&self, algorithm: Algorithm) -> bool {
        self.validation.algorithms.contains(&algorithm)
    }

    /// Verifies the signature and the claims, and returns the claims.
    pub(super) fn decode<T: DeserializeOwned>(
        &self,
        token: &str,
    ) -> Result<T, jsonwebtoken::errors::Error> {
        jsonwebtoken::decode::<T>(token, &self.key, &self.validation).map(|data| data.claims)
    }

    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> ClaimRules {
        ClaimRules::from_settings(&AuthSettings::hs256("unused-secret-0123456789abcdef01"))
    }

    fn jwk(value: serde_json::Value) -> Jwk {
        serde_json::from_value(value).unwrap()
    }

    /// The fixture RSA key's JWK, with `changes` applied.
    fn rsa_jwk(changes: serde_json::Value) -> Jwk {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwk-rsa-a.json");
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (name, change) in changes.as_object().unwrap() {
            match change {
                serde_json::Value::Null => value.as_object_mut().unwrap().remove(name),
                _ => value
                    .as_object_mut()
                    .unwrap()
                    .insert(name.clone(), change.clone()),
            };
        }
        jwk(value)
    }

    #[test]
    fn a_jwk_accepts_its_familys_algorithms_or_only_its_alg() {
        let any_rsa = Key::from_jwk(&rsa_jwk(serde_json::json!({})), &rules()).unwrap();
        assert!(any_rsa.accepts(Algorithm::RS256) && any_rsa.accepts(Algorithm::PS512));
        assert!(!any_rsa.accepts(Algorithm::HS256) && !any_rsa.accepts(Algorithm::ES256));
        assert_eq!(any_rsa.kid(), Some("rsa-a"));

        let rs256_only =
            Key::from_jwk(&rsa_jwk(serde_json::json!({ "alg": "RS256" })), &rules()).unwrap();
        assert!(rs256_only.accepts(Algorithm::RS256));
        assert!(!rs256_only.accepts(Algorithm::PS256));
    }

    #[test]
    fn keys_that_cannot_verify_here_are_refused_with_a_reason() {
        for (case, value) in [
            (
                "HMAC alg on an RSA key",
                rsa_jwk(serde_json::json!({ "alg": "HS256" })),
            ),
            (
                "EC alg on an RSA key",
                rsa_jwk(serde_json::json!({ "alg": "ES256" })),
            ),
            (
                "an encryption key",
                rsa_jwk(serde_json::json!({ "use": "enc" })),
            ),
            (
                "key_ops without verify",
                rsa_jwk(serde_json::json!({ "use": null, "key_ops": ["encrypt"] })),
            ),
            (
                "a symmetric key",
                jwk(
                    serde_json::json!({ "kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ" }),
                ),
            ),
            (
                "an unknown key type",
                jwk(serde_json::json!({ "kty": "PQC", "x": "abc" })),
            ),
            (
                "P-521",
                jwk(serde_json::json!({ "kty": "EC", "crv": "P-521", "x": "AA", "y": "AA" })),
            ),
        ] {
            assert!(Key::from_jwk(&value, &rules()).is_err(), "{case}");
        }
    }

    #[test]
    fn a_retired_key_says_so() {
        let key = Key::hs256("secret", &rules());
        assert!(!key.is_retired());
        key.retire();
        assert!(key.is_retired());
    }
}
