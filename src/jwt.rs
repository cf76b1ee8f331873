//! Short-lived signed tokens (JWT) for browser front-ends: the front-end's
//! own backend mints one per user; the gateway verifies it (an HMAC secret,
//! or the public keys of a JWKS file or URL, refreshed periodically) and maps
//! it to a configured client, whose scopes a claim may narrow.
//!
//! Checked: signature (the algorithm must fit the key: no `none`, no HMAC
//! with a public key), `exp` and `nbf` with a small leeway, `iss`, `aud`.
//! Every failure is the same 401 to the caller; the reason goes to the debug log.

use crate::config::Client;
use arc_swap::ArcSwap;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a client's verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Hmac(crate::secret::Secret),
    JwksFile(PathBuf),
    JwksUrl(http::Uri),
}

/// `[[clients]] jwt = { ... }`, validated.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub issuer: String,
    pub audience: String,
    pub keys: KeySource,
    pub leeway: Duration,
    /// A claim listing scope names (or team ids) the token may use, narrowing the client's teams.
    pub scopes_claim: Option<String>,
    pub jwks_refresh: Duration,
}

struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// One client's verifier.
pub struct Verifier {
    pub client: Arc<Client>,
    settings: JwtSettings,
    keys: ArcSwap<Vec<Arc<Key>>>,
    /// Wakes the JWKS refresh task early: a token named a key we do not have
    /// (the identity provider rotated), or the verifier is going away.
    refresh: Arc<tokio::sync::Notify>,
    /// When an unknown `kid` last woke it ([`UNKNOWN_KID_REFETCH`] apart).
    unknown_kid_refetch: std::sync::Mutex<Option<Instant>>,
}

/// A token whose `kid` is not in the key set fetches the JWKS again at once,
/// at most this often (tokens with made-up `kid`s cannot turn the gateway
/// into a load on the identity provider).
const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
/// The whole JWKS fetch, body included.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed fetch: the next one after this, doubling up to
/// [`JWKS_RETRY_MAX`] (never later than `jwks_refresh`).
const JWKS_RETRY_FIRST: Duration = Duration::from_secs(1);
const JWKS_RETRY_MAX: Duration = Duration::from_secs(60);
/// Tokens remembered as verified (per config generation): a browser
/// front-end sends the same token with every request until it expires.
const VERIFIED_CAPACITY: u64 = 10_000;
/// However long its `exp`, a remembered token is verified again after this.
const VERIFIED_FOR_AT_MOST: Duration = Duration::from_secs(600);

impl Drop for Verifier {
    fn drop(&mut self) {
        // The refresh task holds only a weak reference: let it see that now,
        // not after its next sleep.
        self.refresh.notify_one();
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("client", &self.client.name)
            .field("issuer", &self.settings.issuer)
            .finish()
    }
}

/// What a valid token grants.
#[derive(Debug, Clone)]
pub struct Grant {
    pub client: Arc<Client>,
    /// Scope names or team ids from the scopes claim (`None`: all of the client's).
    pub scopes: Option<Arc<[String]>>,
}

/// Why a token was refused (for logs only).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT")]
    Malformed,
    #[error("no client trusts issuer")]
    UnknownIssuer,
    #[error("no key with this key id")]
    UnknownKey,
    #[error("algorithm not allowed for the key")]
    Algorithm,
    #[error("{0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// Parses a JWKS document into keys with the algorithms each may verify.
/// Keys this gateway cannot use (an algorithm or curve it does not know,
/// encryption keys, symmetric keys) are skipped one by one: an identity
/// provider that also publishes such a key must not lose the others.
pub fn parse_jwks(text: &str) -> Result<Vec<KeyInfo>, String> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet =
        serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let jwks: Vec<Jwk> = raw
        .keys
        .into_iter()
        .filter(|k| k.get("use").is_none_or(|u| u == "sig"))
        .filter_map(|k| serde_json::from_value(k).ok())
        .collect();
    let mut keys = Vec::new();
    for jwk in &jwks {
        let algorithms: Vec<Algorithm> = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (_, Some(alg)) => match alg.to_string().parse::<Algorithm>() {
                Ok(a) => vec![a],
                Err(_) => continue,
            },
            (AlgorithmParameters::RSA(_), None) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            (AlgorithmParameters::EllipticCurve(ec), None) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            },
            (AlgorithmParameters::OctetKeyPair(_), None) => vec![Algorithm::EdDSA],
            // Symmetric keys do not belong in a published key set.
            (AlgorithmParameters::OctetKey(_), None) => continue,
        };
        if algorithms
            .iter()
            .any(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        keys.push(KeyInfo {
            kid: jwk.common.key_id.clone(),
            algorithms,
            key,
        });
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable public key".into());
    }
    Ok(keys)
}

/// The keys last fetched from each JWKS URL in this process. A config
/// reload builds new verifiers; one for a URL fetched before starts with its
/// keys rather than refusing every token until its own first fetch (which
/// an identity provider's blip would put off by a whole `jwks_refresh`).
/// Holds one entry per URL ever configured.
type KeysByUrl = HashMap<String, Arc<Vec<Arc<Key>>>>;

static FETCHED: std::sync::LazyLock<std::sync::Mutex<KeysByUrl>> =
    std::sync::LazyLock::new(Default::default);

fn lock_fetched() -> std::sync::MutexGuard<'static, KeysByUrl> {
    crate::sync::lock(&FETCHED)
}

/// A key from a JWKS document.
pub struct KeyInfo {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl Verifier {
    pub fn new(client: Arc<Client>, settings: JwtSettings) -> Result<Arc<Self>, String> {
        let keys = match &settings.keys {
            KeySource::Hmac(secret) => Arc::new(vec![Arc::new(Key {
                kid: None,
                algorithms: vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                key: DecodingKey::from_secret(secret.expose().as_bytes()),
            })]),
            KeySource::JwksFile(path) => {
                let text = crate::config::read_limited(path, crate::config::MAX_JWKS_FILE_BYTES)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                Arc::new(into_keys(
                    parse_jwks(&text).map_err(|e| format!("{}: {e}", path.display()))?,
                ))
            }
            // Fetched after start (see `spawn_jwks_refresh`): until then the
            // keys last fetched from that URL, if any (a reload makes new
            // verifiers), else nothing verifies.
            KeySource::JwksUrl(url) => lock_fetched()
                .get(&url.to_string())
                .cloned()
                .unwrap_or_default(),
        };
        Ok(Arc::new(Self {
            client,
            settings,
            keys: ArcSwap::new(keys),
            refresh: Arc::new(tokio::sync::Notify::new()),
            unknown_kid_refetch: std::sync::Mutex::new(None),
        }))
    }

    pub fn set_jwks(&self, keys: Vec<KeyInfo>) {
        let keys = Arc::new(into_keys(keys));
        if let KeySource::JwksUrl(url) = &self.settings.keys {
            lock_fetched().insert(url.to_string(), keys.clone());
        }
        self.keys.store(keys);
    }

    /// Asks the refresh task for the key set now, if the keys come from a
    /// URL and no unknown `kid` asked in the last [`UNKNOWN_KID_REFETCH`].
    fn refetch_for_unknown_kid(&self) {
        if !matches!(self.settings.keys, KeySource::JwksUrl(_)) {
            return;
        }
        let mut last = crate::sync::lock(&self.unknown_kid_refetch);
        if last.is_none_or(|t| t.elapsed() >= UNKNOWN_KID_REFETCH) {
            *last = Some(Instant::now());
            self.refresh.notify_one();
        }
    }

    fn verify(
        self: &Arc<Self>,
        token: &str,
        header: &jsonwebtoken::Header,
    ) -> Result<Verified, JwtError> {
        let keys = self.keys.load_full();
        let candidates: Vec<&Arc<Key>> = keys
            .iter()
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => keys.len() == 1,
                (None, _) => true,
            })
            .collect();
        if candidates.is_empty() {
            // With no keys yet, the first fetch (or its retry) is on its way.
            if !keys.is_empty() {
                self.refetch_for_unknown_kid();
            }
            return Err(JwtError::UnknownKey);
        }
        let mut last = JwtError::Algorithm;
        for key in candidates {
            if !key.algorithms.contains(&header.alg) {
                continue;
            }
            let mut v = Validation::new(header.alg);
            v.set_issuer(&[&self.settings.issuer]);
            v.set_audience(&[&self.settings.audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            v.leeway = self.settings.leeway.as_secs();
            v.validate_nbf = true;
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &v) {
                Ok(data) => {
                    let scopes = self.settings.scopes_claim.as_ref().map(|claim| {
                        match data.claims.get(claim) {
                            Some(serde_json::Value::Array(a)) => a
                                .iter()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .collect(),
                            Some(serde_json::Value::String(s)) => {
                                s.split_whitespace().map(str::to_string).collect()
                            }
                            // The claim is configured but absent: no scope at all.
                            _ => Arc::from([]),
                        }
                    });
                    return Ok(Verified {
                        grant: Grant {
                            client: self.client.clone(),
                            scopes,
                        },
                        verifier: Arc::clone(self),
                        keys: Arc::downgrade(&keys),
                        // Required, so present; a value that is no whole
                        // number of seconds is not remembered.
                        exp: data.claims.get("exp").and_then(serde_json::Value::as_u64),
                    });
                }
                Err(e) => last = JwtError::Invalid(e),
            }
        }
        Err(last)
    }
}

/// Seconds since the epoch, as jsonwebtoken reads the clock for `exp`.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn into_keys(keys: Vec<KeyInfo>) -> Vec<Arc<Key>> {
    keys.into_iter()
        .map(|k| {
            Arc::new(Key {
                kid: k.kid,
                algorithms: k.algorithms,
                key: k.key,
            })
        })
        .collect()
}

/// Every JWT client, by issuer (one identity provider may serve several
/// clients, told apart by audience).
pub struct Verifiers {
    by_issuer: HashMap<String, Vec<Arc<Verifier>>>,
    /// Tokens verified lately, by the SHA-256 of the token. Checking a
    /// signature (and parsing the token twice) costs many times a whole cache
    /// hit; a front-end's user presents the same token until it expires.
    verified: moka::sync::Cache<[u8; 32], Arc<Verified>>,
}

impl Default for Verifiers {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl std::fmt::Debug for Verifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifiers")
            .field("by_issuer", &self.by_issuer)
            .finish_non_exhaustive()
    }
}

/// A token that passed every check, and what it was checked against.
struct Verified {
    grant: Grant,
    verifier: Arc<Verifier>,
    /// The key set it was verified with: once the verifier holds another (a
    /// JWKS refresh or rotation), the token is checked again. Weak: an old
    /// set is not kept, yet its address cannot be taken by a new one.
    keys: std::sync::Weak<Vec<Arc<Key>>>,
    /// `exp`, in seconds since the epoch (`None`: not remembered).
    exp: Option<u64>,
}

impl Verified {
    /// Whether it would pass the checks again now: the same key set, and
    /// `exp` (with the leeway) not passed. `nbf` only ever passes with time.
    fn still_valid(&self, now: u64) -> bool {
        let current = self.verifier.keys.load();
        std::ptr::eq(self.keys.as_ptr(), Arc::as_ptr(&current))
            && self.exp.is_some_and(|exp| {
                now <= exp.saturating_add(self.verifier.settings.leeway.as_secs())
            })
    }
}

impl Verifiers {
    pub fn new(verifiers: Vec<Arc<Verifier>>) -> Self {
        let mut by_issuer: HashMap<String, Vec<Arc<Verifier>>> = HashMap::new();
        for v in verifiers {
            by_issuer
                .entry(v.settings.issuer.clone())
                .or_default()
                .push(v);
        }
        Self {
            by_issuer,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_FOR_AT_MOST)
                .build(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_issuer.is_empty()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Verifier>> {
        self.by_issuer.values().flatten()
    }

    /// Verifies a compact JWT; the issuer claim (and, when one issuer serves
    /// several clients, the audience claim) picks the client. A token that
    /// passed before is not checked again while its key set and `exp` hold
    /// (for at most [`VERIFIED_FOR_AT_MOST`]).
    pub fn verify(&self, token: &str) -> Result<Grant, JwtError> {
        self.verify_with_digest(token, &crate::secret::token_digest(token.as_bytes()))
    }

    /// [`Self::verify`], given the token's SHA-256 (taken once per request).
    pub fn verify_with_digest(&self, token: &str, digest: &[u8; 32]) -> Result<Grant, JwtError> {
        if let Some(seen) = self.verified.get(digest) {
            if seen.still_valid(unix_now()) {
                metrics::counter!("rungen_gateway_signed_tokens_total", "outcome" => "remembered")
                    .increment(1);
                return Ok(seen.grant.clone());
            }
            self.verified.invalidate(digest);
        }
        match self.check(token) {
            Ok(verified) => {
                metrics::counter!("rungen_gateway_signed_tokens_total", "outcome" => "verified")
                    .increment(1);
                let grant = verified.grant.clone();
                if verified.exp.is_some() {
                    self.verified.insert(*digest, Arc::new(verified));
                }
                Ok(grant)
            }
            Err(e) => {
                metrics::counter!("rungen_gateway_signed_tokens_total", "outcome" => "refused")
                    .increment(1);
                Err(e)
            }
        }
    }

    /// Every check, from the start.
    fn check(&self, token: &str) -> Result<Verified, JwtError> {
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| JwtError::Malformed)?;
        let claims: serde_json::Value =
            serde_json::from_slice(&payload).map_err(|_| JwtError::Malformed)?;
        let issuer = claims
            .get("iss")
            .and_then(|i| i.as_str())
            .ok_or(JwtError::UnknownIssuer)?;
        let verifier = match self.by_issuer.get(issuer).map(Vec::as_slice) {
            None | Some([]) => return Err(JwtError::UnknownIssuer),
            Some([only]) => only,
            Some(several) => {
                let names = |a: &str| several.iter().find(|v| v.settings.audience == a);
                match claims.get("aud") {
                    Some(serde_json::Value::String(a)) => names(a),
                    Some(serde_json::Value::Array(all)) => {
                        all.iter().filter_map(|a| a.as_str()).find_map(names)
                    }
                    _ => None,
                }
                .ok_or(JwtError::UnknownIssuer)?
            }
        };
        verifier.verify(token, &header)
    }
}

/// Whether a bearer token looks like a compact JWT (three base64url parts).
pub fn looks_like_jwt(token: &[u8]) -> bool {
    token.iter().filter(|b| **b == b'.').count() == 2
        && token
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.=".contains(b))
}

/// Fetches the verifier's JWKS URL now, then every `jwks_refresh`, until the
/// verifier is dropped. A failed fetch is tried again after 1 s, doubling up
/// to a minute (never later than `jwks_refresh`); a token with an unknown
/// `kid` fetches at once (at most every 10 s).
pub fn spawn_jwks_refresh(verifier: &Arc<Verifier>) {
    let KeySource::JwksUrl(url) = verifier.settings.keys.clone() else {
        return;
    };
    let weak = Arc::downgrade(verifier);
    let every = verifier.settings.jwks_refresh;
    let wake = verifier.refresh.clone();
    tokio::spawn(async move {
        let client = match jwks_client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "JWKS client setup failed");
                return;
            }
        };
        let mut retry = JWKS_RETRY_FIRST;
        loop {
            // No strong reference while fetching: a reload may drop the verifier.
            let fetched = tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch_jwks(&client, &url))
                .await
                .unwrap_or_else(|_| Err("timed out".to_string()));
            let Some(v) = weak.upgrade() else { return };
            let next = match fetched {
                Ok(keys) => {
                    v.set_jwks(keys);
                    tracing::info!(client = %v.client.name, %url, "JWKS refreshed");
                    retry = JWKS_RETRY_FIRST;
                    every
                }
                Err(e) => {
                    let next = retry.min(every);
                    retry = (retry * 2).min(JWKS_RETRY_MAX);
                    tracing::warn!(client = %v.client.name, %url, error = %e, retry_in = ?next, "JWKS fetch failed; keeping the previous keys");
                    next
                }
            };
            drop(v);
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = wake.notified() => {}
            }
            if weak.strong_count() == 0 {
                return;
            }
        }
    });
}

type JwksClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

fn jwks_client() -> Result<JwksClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(crate::upstream::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

async fn fetch_jwks(client: &JwksClient, url: &http::Uri) -> Result<Vec<KeyInfo>, String> {
    use http_body_util::BodyExt;
    let res = client.get(url.clone()).await.map_err(|e| e.to_string())?;
    if !res.status().is_success() {
        return Err(format!("status {}", res.status()));
    }
    let body = http_body_util::Limited::new(res.into_body(), 1024 * 1024)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    parse_jwks(&String::from_utf8_lossy(&body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn client() -> Arc<Client> {
        Arc::new(Client {
            name: "web".into(),
            token_sha256: None,
            cert_names: vec![],
            teams: Default::default(),
            methods: [http::Method::GET].iter().collect(),
            public: false,
            index: 0,
            allowed_origins: vec![],
        })
    }

    fn verifiers(scopes_claim: Option<&str>) -> Verifiers {
        verifiers_with(scopes_claim, Duration::from_secs(5))
    }

    fn verifiers_with(scopes_claim: Option<&str>, leeway: Duration) -> Verifiers {
        let v = Verifier::new(
            client(),
            JwtSettings {
                issuer: "https://auth.example".into(),
                audience: "rungen-gateway".into(),
                keys: KeySource::Hmac(Secret::new(SECRET)),
                leeway,
                scopes_claim: scopes_claim.map(str::to_string),
                jwks_refresh: Duration::from_secs(300),
            },
        )
        .unwrap();
        Verifiers::new(vec![v])
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    const SECRET: &str = "s3cret-s3cret-s3cret-s3cret-s3cret";

    #[test]
    fn accepts_a_valid_token_and_refuses_the_rest() {
        let v = verifiers(Some("teams"));
        let good = serde_json::json!({"iss": "https://auth.example", "aud": "rungen-gateway", "exp": now() + 60, "teams": ["acme"]});
        let grant = v.verify(&token(good.clone(), SECRET)).unwrap();
        assert_eq!(grant.client.name, "web");
        assert_eq!(grant.scopes.as_deref(), Some(&["acme".to_string()][..]));

        let mut expired = good.clone();
        expired["exp"] = (now() - 60).into();
        assert!(v.verify(&token(expired, SECRET)).is_err());
        let mut aud = good.clone();
        aud["aud"] = "someone-else".into();
        assert!(v.verify(&token(aud, SECRET)).is_err());
        let mut iss = good.clone();
        iss["iss"] = "https://evil.example".into();
        assert!(matches!(
            v.verify(&token(iss, SECRET)),
            Err(JwtError::UnknownIssuer)
        ));
        let mut nbf = good.clone();
        nbf["nbf"] = (now() + 3600).into();
        assert!(v.verify(&token(nbf, SECRET)).is_err());
        assert!(
            v.verify(&token(good.clone(), "wrong-secret")).is_err(),
            "bad signature"
        );
        // alg=none is never accepted.
        let t = token(good, SECRET);
        let mut parts: Vec<&str> = t.split('.').collect();
        let none = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"alg":"none","typ":"JWT"}"#);
        parts[0] = &none;
        assert!(v.verify(&format!("{}.{}.", parts[0], parts[1])).is_err());
        assert!(v.verify("not-a-jwt").is_err());
    }

    /// A verified token is not checked again (no parse, no signature) while
    /// its key set and `exp` hold; a new key set checks it again.
    #[test]
    fn a_token_is_checked_once_while_its_key_set_holds() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let v = verifiers(Some("teams"));
        let claims = serde_json::json!({"iss": "https://auth.example", "aud": "rungen-gateway", "exp": now() + 60, "teams": ["acme"]});
        let t = token(claims, SECRET);
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..5 {
                let grant = v.verify(&t).unwrap();
                assert_eq!(grant.client.name, "web");
                assert_eq!(grant.scopes.as_deref(), Some(&["acme".to_string()][..]));
            }
        });
        let text = metrics.render();
        assert!(
            text.contains(r#"rungen_gateway_signed_tokens_total{outcome="verified"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"rungen_gateway_signed_tokens_total{outcome="remembered"} 4"#),
            "{text}"
        );
        // The keys change (a JWKS refresh, a rotation): the token is checked
        // against the new set, which no longer has the key that signed it.
        v.all().next().unwrap().set_jwks(vec![KeyInfo {
            kid: None,
            algorithms: vec![Algorithm::HS256],
            key: DecodingKey::from_secret(b"the-next-secret-the-next-secret-xx"),
        }]);
        assert!(v.verify(&t).is_err(), "verified with a key no longer held");
        // A token that fails is never remembered: checked every time.
        assert!(v.verify(&t).is_err());
    }

    /// A remembered token stops working when its `exp` (plus the leeway) passes.
    #[test]
    fn a_remembered_token_expires_on_time() {
        let v = verifiers_with(None, Duration::ZERO);
        let exp = now() + 1;
        let t = token(
            serde_json::json!({"iss": "https://auth.example", "aud": "rungen-gateway", "exp": exp}),
            SECRET,
        );
        assert!(v.verify(&t).is_ok());
        assert!(v.verify(&t).is_ok(), "remembered");
        while now() <= exp {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(v.verify(&t).is_err(), "expired, remembered or not");
    }

    #[test]
    fn leeway_allows_small_clock_skew() {
        let v = verifiers(None);
        let claims = serde_json::json!({"iss": "https://auth.example", "aud": "rungen-gateway", "exp": now() - 2});
        assert!(v.verify(&token(claims, SECRET)).is_ok());
    }

    #[test]
    fn a_jwks_keeps_its_usable_keys_beside_ones_it_cannot_use() {
        let good = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": "ok", "alg": "ES256", "use": "sig",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        });
        // P-521 / ES512: not an algorithm jsonwebtoken knows.
        let es512 = serde_json::json!({
            "kty": "EC", "crv": "P-521", "kid": "p521", "alg": "ES512", "use": "sig",
            "x": "AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk",
            "y": "ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDly79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2",
        });
        let mut encryption = good.clone();
        encryption["use"] = "enc".into();
        encryption["kid"] = "enc".into();
        let set = serde_json::json!({"keys": [es512, good, encryption, {"kty": "XYZ"}]});
        let keys = parse_jwks(&set.to_string()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("ok"));
        let none = serde_json::json!({"keys": [{"kty": "XYZ"}]});
        assert!(parse_jwks(&none.to_string()).is_err());
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt(b"eyJhbGciOi.eyJpc3Mi.c2ln"));
        assert!(!looks_like_jwt(b"rgw_0123456789abcdef"));
        assert!(!looks_like_jwt(b"a.b"));
    }
}
