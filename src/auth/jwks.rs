//! JWKS: sets of public keys, chosen by a token's `kid`, read from a file
//! (`AUTH_JWKS_FILE`) or fetched from a URL (`AUTH_JWKS_URL`) and loaded
//! again in the background, so that keys rotate without a restart.
//!
//! A load that fails keeps the keys of the last good one (an identity
//! provider that is down for a while does not lock every caller out); a key
//! that a successful load no longer lists is retired at once, which also
//! ends the tokens it verified that the authenticator remembers.

use std::{
    fmt,
    io::Read as _,
    path::{Path, PathBuf},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;
use tokio::{sync::Notify, time::Instant};
use tokio_util::task::AbortOnDropHandle;

use super::keys::{ClaimRules, Key};

/// Largest JWKS document read, from a file or over HTTP: real ones hold a few
/// keys in a few KiB.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Longest a fetch of `AUTH_JWKS_URL` may take, connection and body included.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Redirects followed when fetching `AUTH_JWKS_URL`.
const MAX_REDIRECTS: usize = 3;

/// Where a key set comes from.
#[derive(Clone, Debug)]
pub(super) enum Origin {
    File(PathBuf),
    Url(reqwest::Client, url::Url),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "AUTH_JWKS_FILE {}", path.display()),
            Self::Url(_, url) => write!(f, "AUTH_JWKS_URL {url}"),
        }
    }
}

impl Origin {
    pub(super) fn url(url: &url::Url) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(JWKS_FETCH_TIMEOUT)
            .connect_timeout(JWKS_FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            // An https URL is never redirected to plain HTTP.
            .https_only(url.scheme() == "https")
            .user_agent(concat!("channel-assignment/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot set up the HTTP client for AUTH_JWKS_URL")?;
        Ok(Self::Url(client, url.clone()))
    }

    /// The document's bytes, at most `MAX_JWKS_BYTES` of them.
    async fn load(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            Self::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_file(&path))
                    .await
                    .context("the file reader stopped")?
            }
            Self::Url(client, url) => fetch(client, url).await,
        }
    }
}

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path).context("cannot open it")?;
    let mut bytes = Vec::new();
    file.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .context("cannot read it")?;
    anyhow::ensure!(
        bytes.len() <= MAX_JWKS_BYTES,
        "it is larger than {} KiB",
        MAX_JWKS_BYTES / 1024
    );
    Ok(bytes)
}

async fn fetch(client: &reqwest::Client, url: &url::Url) -> anyhow::Result<Vec<u8>> {
    let too_large = || format!("the document is larger than {} KiB", MAX_JWKS_BYTES / 1024);
    let mut response = client
        .get(url.clone())
        .header(
            http::header::ACCEPT,
            "application/jwk-set+json, application/json",
        )
        .send()
        .await?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "it answered HTTP {status}");
    if response
        .content_length()
        .is_some_and(|length| length > MAX_JWKS_BYTES as u64)
    {
        anyhow::bail!(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        anyhow::ensure!(body.len() + chunk.len() <= MAX_JWKS_BYTES, too_large());
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// One version of a JWKS: the keys that can verify tokens here, and the
/// entries that cannot (said once, not at every load).
#[derive(Default)]
struct KeySet {
    keys: Vec<Arc<Key>>,
    skipped: Vec<serde_json::Value>,
}

/// What a JWKS document is, before its keys are looked at one by one (one
/// strange key does not make the others unusable).
#[derive(Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// The keys of `document`; a key already in `previous` (the same JWK) is
    /// carried over as it is, so that what it verified stays remembered.
    fn parse(
        document: &[u8],
        rules: &ClaimRules,
        previous: &KeySet,
        origin: &Origin,
    ) -> anyhow::Result<Self> {
        let document: Document = serde_json::from_slice(document)
            .context("it is not a JWKS (a JSON object with a \"keys\" array)")?;
        let mut set = KeySet::default();
        for value in document.keys {
            let usable = serde_json::from_value::<Jwk>(value.clone())
                .map_err(|_| "not a JWK")
                .and_then(|jwk| match previous.find_same(&jwk) {
                    Some(same) => Ok(same),
                    None => Key::from_jwk(&jwk, rules).map(Arc::new),
                });
            match usable {
                Ok(key) => set.keys.push(key),
                Err(reason) => {
                    if !previous.skipped.contains(&value) {
                        let kid = value.get("kid").and_then(serde_json::Value::as_str);
                        tracing::warn!(
                            source = %origin,
                            kid = kid.unwrap_or_default(),
                            reason,
                            "JWKS key skipped"
                        );
                    }
                    set.skipped.push(value);
                }
            }
        }
        anyhow::ensure!(
            !set.keys.is_empty(),
            "it holds no key that can verify tokens here (RSA, EC P-256/P-384 or Ed25519 \
             signature keys)"
        );
        Ok(set)
    }

    fn find_same(&self, jwk: &Jwk) -> Option<Arc<Key>> {
        self.keys
            .iter()
            .find(|key| key.jwk() == Some(jwk))
            .map(Arc::clone)
    }

    fn contains(&self, key: &Arc<Key>) -> bool {
        self.keys.iter().any(|kept| Arc::ptr_eq(kept, key))
    }
}

/// A JWKS and where it comes from, shared by the authenticator (which reads
/// it on every token it has not seen) and the task that loads it again.
pub(super) struct JwksSource {
    origin: Origin,
    rules: ClaimRules,
    current: RwLock<Arc<KeySet>>,
    /// Set by a token whose `kid` is in no key set; cleared as a load starts,
    /// which serves every token that asked before it.
    wanted: AtomicBool,
    /// Wakes the refresher when `wanted` is set.
    wake: Notify,
}

impl JwksSource {
    /// Loads the set once; a source that cannot be loaded, or holds no
    /// usable key, stops the start.
    pub(super) async fn load(origin: Origin, rules: ClaimRules) -> anyhow::Result<Self> {
        let document = origin
            .load()
            .await
            .with_context(|| format!("cannot load {origin}"))?;
        let keys = KeySet::parse(&document, &rules, &KeySet::default(), &origin)
            .with_context(|| format!("cannot use {origin}"))?;
        tracing::info!(source = %origin, keys = keys.keys.len(), "JWKS loaded");
        Ok(Self {
            origin,
            rules,
            current: RwLock::new(Arc::new(keys)),
            wanted: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    /// Every key of the set with this `kid` (a set may use one kid for keys
    /// of several types).
    pub(super) fn find(&self, kid: &str) -> Vec<Arc<Key>> {
        self.snapshot()
            .keys
            .iter()
            .filter(|key| key.kid() == Some(kid))
            .map(Arc::clone)
            .collect()
    }

    /// Every key of the set that takes `algorithm`.
    pub(super) fn accepting(&self, algorithm: jsonwebtoken::Algorithm) -> Vec<Arc<Key>> {
        self.snapshot()
            .keys
            .iter()
            .filter(|key| key.accepts(algorithm))
            .map(Arc::clone)
            .collect()
    }

    /// Asks the refresher for a load as soon as its minimum interval allows.
    pub(super) fn request_refresh(&self) {
        if !self.wanted.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    fn snapshot(&self) -> Arc<KeySet> {
        // A panic while swapping cannot leave the Arc half-written.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts a new version of the document in place and retires the keys it
    /// no longer lists.
    fn install(&self, document: &[u8]) -> anyhow::Result<()> {
        let previous = self.snapshot();
        let next = Arc::new(KeySet::parse(
            document,
            &self.rules,
            &previous,
            &self.origin,
        )?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&next);
        let mut retired = 0;
        for key in &previous.keys {
            if !next.contains(key) {
                key.retire();
                retired += 1;
            }
        }
        let added = next
            .keys
            .iter()
            .filter(|key| !previous.contains(key))
            .count();
        if added == 0 && retired == 0 {
            return Ok(());
        }
        tracing::info!(
            source = %self.origin,
            keys = next.keys.len(),
            added,
            retired,
            "JWKS changed"
        );
        Ok(())
    }

    /// Loads the set again every `interval`, and when a token names an
    /// unknown `kid` but never sooner than `min_interval` after the last
    /// load, however many such tokens come. Ends when the handle is dropped.
    pub(super) fn refresh_in_background(
        self: Arc<Self>,
        interval: Duration,
        min_interval: Duration,
    ) -> AbortOnDropHandle<()> {
        AbortOnDropHandle::new(tokio::spawn(async move {
            // The load at start is the first one.
            let mut last_load = Instant::now();
            let mut next_load = last_load + interval;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next_load) => {}
                    () = self.wake.notified() => {
                        tokio::time::sleep_until((last_load + min_interval).min(next_load)).await;
                    }
                }
                self.wanted.store(false, Ordering::Relaxed);
                last_load = Instant::now();
                next_load = last_load + interval;
                let outcome = match self.origin.load().await {
                    Ok(document) => self.install(&document),
                    Err(error) => Err(error),
                };
                if let Err(error) = outcome {
                    // Tried again sooner than a good load would be.
                    next_load = last_load + min_interval.min(interval);
                    tracing::warn!(
                        source = %self.origin,
                        error = format!("{error:#}"),
                        "cannot load the JWKS: keeping the keys of the last good load"
                    );
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthSettings;

    fn rules() -> ClaimRules {
        ClaimRules::from_settings(&AuthSettings::hs256("unused-secret-0123456789abcdef01"))
    }

    fn fixture(name: &str) -> serde_json::Value {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn document(keys: &[serde_json::Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }

    fn origin() -> Origin {
        Origin::File("test.json".into())
    }

    #[test]
    fn a_key_kept_across_versions_is_the_same_key_and_a_removed_one_is_retired() {
        let (a, b) = (fixture("jwk-rsa-a.json"), fixture("jwk-rsa-b.json"));
        let first = KeySet::parse(
            &document(std::slice::from_ref(&a)),
            &rules(),
            &KeySet::default(),
            &origin(),
        )
        .unwrap();
        let source = JwksSource {
            origin: origin(),
            rules: rules(),
            current: RwLock::new(Arc::new(first)),
            wanted: AtomicBool::new(false),
            wake: Notify::new(),
        };
        let key_a = source.find("rsa-a").pop().unwrap();

        source.install(&document(&[a, b.clone()])).unwrap();
        assert!(Arc::ptr_eq(&source.find("rsa-a")[0], &key_a));
        assert!(!key_a.is_retired());
        assert_eq!(source.find("rsa-b").len(), 1);

        source.install(&document(&[b])).unwrap();
        assert!(key_a.is_retired());
        assert!(source.find("rsa-a").is_empty());
    }

    #[test]
    fn unusable_entries_are_skipped_and_a_set_without_usable_keys_is_refused() {
        let set = KeySet::parse(
            &document(&[
                serde_json::json!({ "kty": "oct", "k": "c2VjcmV0", "kid": "hmac" }),
                serde_json::json!({ "kid": 7 }),
                fixture("jwk-es256-c.json"),
            ]),
            &rules(),
            &KeySet::default(),
            &origin(),
        )
        .unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.skipped.len(), 2);

        for refused in [
            document(&[serde_json::json!({ "kty": "oct", "k": "c2VjcmV0" })]),
            document(&[]),
            b"{\"keys\": 3}".to_vec(),
            b"not json".to_vec(),
        ] {
            assert!(
                KeySet::parse(&refused, &rules(), &KeySet::default(), &origin()).is_err(),
                "{}",
                String::from_utf8_lossy(&refused)
            );
        }
    }

    #[test]
    fn files_larger_than_the_limit_are_refused() {
        let path = std::env::temp_dir().join(format!("jwks-{}.json", uuid::Uuid::new_v4()));
        std::fs::write(&path, vec![b' '; MAX_JWKS_BYTES + 1]).unwrap();
        let error = read_file(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(error.to_string().contains("larger than"), "{error}");
    }
}
