//! Caller authentication: turns the caller's credential into a [`Caller`]
//! (client, chosen team scope) in the request extensions.
//!
//! The token comes from `Authorization: Bearer <token>` or `x-api-key: <token>`
//! (so an existing RunGen client only changes its base URL). The gateway knows
//! tokens only by their SHA-256. The scope is the client's default, or the one
//! the caller names with `x-team-id` (a team id, or a scope name) if allowed.
//! This step never sees upstream keys; it only picks the scope.

use crate::config::{Client, Team};
use crate::context::RequestContext;
use crate::error::{Body, GatewayError, error_response};
use crate::jwt::{Verifiers, looks_like_jwt};
use crate::rate_limit::Limits;
use crate::secret::token_digest;
use crate::step::{Step, StepFuture};
use crate::tls::ClientCertIdentity;
use crate::upstream_credentials::{X_API_KEY, X_TEAM_ID};
use http::{HeaderMap, Method, Request, Response, header};
use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The authenticated caller and the scope this request runs in.
#[derive(Debug, Clone)]
pub struct Caller {
    pub client: Arc<Client>,
    pub scope: Arc<Team>,
}

/// Who the caller was, put on the response for the access log (set even when
/// the caller was identified but then refused): [`crate::telemetry::LogFields::caller`].
#[derive(Debug, Clone)]
pub struct CallerLog {
    pub client: Arc<Client>,
    pub scope: Option<Arc<Team>>,
}

/// Clients by token digest, client-certificate name, and (public clients)
/// origin; signed-token verifiers by issuer.
#[derive(Debug, Default)]
pub struct Credentials {
    /// SHA-256 digests are uniform whatever the token, so a fast hash is as
    /// good as SipHash here (and the map holds configured clients only).
    by_digest: HashMap<[u8; 32], Arc<Client>, foldhash::fast::RandomState>,
    by_cert_name: HashMap<String, Arc<Client>>,
    public_by_origin: HashMap<String, Arc<Client>>,
    jwt: Verifiers,
}

impl Credentials {
    pub fn new(clients: &[Arc<Client>]) -> Self {
        Self::with_jwt(clients, Verifiers::default())
    }

    pub fn with_jwt(clients: &[Arc<Client>], jwt: Verifiers) -> Self {
        Self {
            jwt,
            public_by_origin: clients
                .iter()
                .filter(|c| c.public)
                .flat_map(|c| {
                    c.allowed_origins
                        .iter()
                        .map(move |o| (o.clone(), c.clone()))
                })
                .collect(),
            by_digest: clients
                .iter()
                .filter_map(|c| Some((c.token_sha256?, c.clone())))
                .collect(),
            by_cert_name: clients
                .iter()
                .flat_map(|c| c.cert_names.iter().map(move |n| (n.clone(), c.clone())))
                .collect(),
        }
    }

    pub fn lookup(&self, token: &[u8]) -> Option<&Arc<Client>> {
        self.lookup_digest(&token_digest(token))
    }

    /// [`Self::lookup`] by the token's SHA-256, taken once per request: a
    /// signed token that is no gateway token is then looked up by the same
    /// digest among the tokens verified lately.
    pub fn lookup_digest(&self, digest: &[u8; 32]) -> Option<&Arc<Client>> {
        self.by_digest.get(digest)
    }

    /// The client a verified client certificate maps to (first matching name).
    pub fn lookup_cert(&self, identity: &ClientCertIdentity) -> Option<&Arc<Client>> {
        identity.names.iter().find_map(|n| self.by_cert_name.get(n))
    }
}

/// The caller's token, from `Authorization: Bearer` or `x-api-key`.
pub fn extract_token(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            let token = v[7..].trim_ascii();
            return (!token.is_empty()).then_some(token);
        }
        return None;
    }
    let token = headers.get(X_API_KEY)?.as_bytes().trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Picks the scope: the named one if the client may use it, else the default.
pub fn choose_scope(client: &Client, headers: &HeaderMap) -> Result<Arc<Team>, GatewayError> {
    choose_scope_within(client, headers, None)
}

/// Like [`choose_scope`], limited to the scopes a signed token grants (by
/// scope name or team id) when it names any.
pub fn choose_scope_within(
    client: &Client,
    headers: &HeaderMap,
    granted: Option<&[String]>,
) -> Result<Arc<Team>, GatewayError> {
    let permitted = |t: &Arc<Team>| {
        granted.is_none_or(|g| {
            g.iter().any(|s| {
                *s == t.name
                    || t.team_id
                        .as_ref()
                        .is_some_and(|id| id.as_bytes().eq_ignore_ascii_case(s.as_bytes()))
            })
        })
    };
    let requested = headers
        .get(X_TEAM_ID)
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|v| !v.is_empty());
    match requested {
        None => client.teams.iter().find(|t| permitted(t)).cloned(),
        Some(wanted) => client
            .teams
            .iter()
            // Team ids are UUIDs: any letter case names the same team.
            .find(|t| {
                t.team_id
                    .as_ref()
                    .is_some_and(|id| id.as_bytes().eq_ignore_ascii_case(wanted))
            })
            .or_else(|| client.teams.iter().find(|t| t.name.as_bytes() == wanted))
            .filter(|t| permitted(t))
            .cloned(),
    }
    .ok_or(GatewayError::ScopeForbidden)
}

fn method_allowed(client: &Client, method: &Method) -> bool {
    client.methods.contains(method)
}

#[derive(Clone, Debug)]
pub struct CallerAuthLayer {
    credentials: Arc<Credentials>,
    limits: Arc<Limits>,
}

impl CallerAuthLayer {
    pub fn new(credentials: Arc<Credentials>, limits: Arc<Limits>) -> Self {
        Self {
            credentials,
            limits,
        }
    }
}

impl<S> tower::Layer<S> for CallerAuthLayer {
    type Service = CallerAuth<S>;
    fn layer(&self, inner: S) -> CallerAuth<S> {
        CallerAuth {
            inner,
            credentials: self.credentials.clone(),
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CallerAuth<S> {
    inner: S,
    credentials: Arc<Credentials>,
    limits: Arc<Limits>,
}

impl<S> tower::Service<Request<Body>> for CallerAuth<S>
where
    S: Step,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = StepFuture<Response<Body>, GatewayError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // A token wins (an opaque gateway token, or a signed JWT); without one,
        // a verified client certificate, or for public clients the Origin.
        let mut granted: Option<Arc<[String]>> = None;
        // The token's SHA-256, taken once: the gateway tokens and the signed
        // tokens verified lately are both found by it.
        let client = match extract_token(req.headers()).map(|t| (t, token_digest(t))) {
            Some((t, digest)) => match self.credentials.lookup_digest(&digest) {
                Some(c) => Some(c.clone()),
                None if !self.credentials.jwt.is_empty() && looks_like_jwt(t) => {
                    // An IP past its failed-auth limit buys no signature checks.
                    if let Some(wait) = self
                        .limits
                        .source_ip(&req)
                        .and_then(|ip| self.limits.refused_ip_wait(ip))
                    {
                        return StepFuture::ok(error_response(&GatewayError::RateLimited {
                            policy: "unauthenticated",
                            retry_after: wait,
                        }));
                    }
                    let verified = std::str::from_utf8(t)
                        .map(|t| self.credentials.jwt.verify_with_digest(t, &digest));
                    match verified {
                        Ok(Ok(grant)) => {
                            granted = grant.scopes;
                            Some(grant.client)
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(reason = %e, "signed token refused");
                            None
                        }
                        Err(_) => None,
                    }
                }
                None => None,
            },
            None => RequestContext::of(req.extensions())
                .cert
                .as_ref()
                .and_then(|id| self.credentials.lookup_cert(id))
                .cloned()
                .or_else(|| {
                    let origin = req.headers().get(header::ORIGIN)?.to_str().ok()?;
                    self.credentials
                        .public_by_origin
                        .get(&origin.to_ascii_lowercase())
                        .cloned()
                }),
        };
        let Some(client) = client else {
            // A browser without a credential from an origin no client allows: 403.
            if extract_token(req.headers()).is_none()
                && !self.credentials.public_by_origin.is_empty()
                && req.headers().get(header::ORIGIN).is_some_and(|o| {
                    o.to_str().is_ok_and(|o| {
                        !self
                            .credentials
                            .public_by_origin
                            .contains_key(&o.to_ascii_lowercase())
                    })
                })
            {
                return StepFuture::ok(error_response(&GatewayError::OriginForbidden));
            }
            // Failed authentication spends the source IP's budget, never a client's.
            let err = match self.limits.source_ip(&req) {
                Some(ip) => match self.limits.check_unauthenticated(ip) {
                    Ok(()) => GatewayError::Unauthenticated,
                    Err(wait) => GatewayError::RateLimited {
                        policy: "unauthenticated",
                        retry_after: wait,
                    },
                },
                None => GatewayError::Unauthenticated,
            };
            return StepFuture::ok(error_response(&err));
        };
        let refuse = |client: Arc<Client>, err: GatewayError| {
            let mut res = error_response(&err);
            crate::telemetry::LogFields::of(&mut res).caller = Some(CallerLog {
                client,
                scope: None,
            });
            StepFuture::ok(res)
        };
        let scope = match choose_scope_within(&client, req.headers(), granted.as_deref()) {
            Ok(scope) => scope,
            Err(err) => return refuse(client, err),
        };
        if !method_allowed(&client, req.method()) {
            return refuse(client, GatewayError::MethodForbidden);
        }
        let log = CallerLog {
            client: client.clone(),
            scope: Some(scope.clone()),
        };
        RequestContext::of_mut(req.extensions_mut()).caller = Some(Caller { client, scope });
        self.inner.call(req).map_ok(move |mut res| {
            crate::telemetry::LogFields::of(&mut res).caller = Some(log);
            res
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use http::HeaderValue;

    fn team(name: &str, id: Option<&str>) -> Arc<Team> {
        Arc::new(Team {
            name: name.into(),
            team_id: id.map(|i| HeaderValue::from_str(i).unwrap()),
            api_key: Secret::new("k"),
        })
    }

    fn client() -> Client {
        Client {
            name: "c".into(),
            token_sha256: Some(token_digest(b"tok")),
            cert_names: vec!["svc.internal".into()],
            public: false,
            index: 0,
            allowed_origins: vec![],
            teams: vec![team("personal", None), team("acme", Some("t-1"))].into(),
            methods: [Method::GET].iter().collect(),
        }
    }

    #[test]
    fn token_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(extract_token(&h), None);
        h.insert("x-api-key", HeaderValue::from_static("abc"));
        assert_eq!(extract_token(&h), Some(&b"abc"[..]));
        h.insert("authorization", HeaderValue::from_static("bEaReR  xyz "));
        assert_eq!(extract_token(&h), Some(&b"xyz"[..]));
        h.insert("authorization", HeaderValue::from_static("Basic Zm9v"));
        assert_eq!(
            extract_token(&h),
            None,
            "a non-bearer Authorization is not a token"
        );
    }

    #[test]
    fn scope_is_default_or_an_allowed_named_one() {
        let c = client();
        let mut h = HeaderMap::new();
        assert_eq!(choose_scope(&c, &h).unwrap().name, "personal");
        h.insert("x-team-id", HeaderValue::from_static("t-1"));
        assert_eq!(choose_scope(&c, &h).unwrap().name, "acme");
        h.insert("x-team-id", HeaderValue::from_static("acme"));
        assert_eq!(choose_scope(&c, &h).unwrap().name, "acme");
        h.insert("x-team-id", HeaderValue::from_static("t-2"));
        assert!(matches!(
            choose_scope(&c, &h),
            Err(GatewayError::ScopeForbidden)
        ));
        h.insert("x-team-id", HeaderValue::from_static(""));
        assert_eq!(choose_scope(&c, &h).unwrap().name, "personal");
        // A signed token granting only acme: the default becomes acme, personal is refused.
        let granted = vec!["t-1".to_string()];
        assert_eq!(
            choose_scope_within(&c, &h, Some(&granted)).unwrap().name,
            "acme"
        );
        h.insert("x-team-id", HeaderValue::from_static("personal"));
        assert!(choose_scope_within(&c, &h, Some(&granted)).is_err());
        assert!(choose_scope_within(&c, &HeaderMap::new(), Some(&[])).is_err());
    }

    #[test]
    fn lookup_is_by_digest() {
        let c = Arc::new(client());
        let creds = Credentials::new(&[c]);
        assert!(creds.lookup(b"tok").is_some());
        assert!(creds.lookup(b"tok2").is_none());
        let id = ClientCertIdentity {
            names: vec!["other".into(), "svc.internal".into()],
        };
        assert_eq!(creds.lookup_cert(&id).unwrap().name, "c");
        let nobody = ClientCertIdentity {
            names: vec!["other".into()],
        };
        assert!(creds.lookup_cert(&nobody).is_none());
    }
}
