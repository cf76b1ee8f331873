//! What the steps learn about a request, for the steps after them: one request
//! extension, each step filling its field as the request passes down the chain
//! (one allocation per request instead of one per fact; the response's
//! counterpart, for the access log, is [`crate::telemetry::LogFields`]).

use crate::caller_auth::Caller;
use crate::routing::Route;
use crate::tls::ClientCertIdentity;
use http::Extensions;
use std::net::SocketAddr;

#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// The TCP peer of the connection (listener).
    pub peer: Option<SocketAddr>,
    /// The verified client certificate, on TLS listeners that ask for one (listener).
    pub cert: Option<ClientCertIdentity>,
    /// The route (Routing).
    pub route: Option<Route>,
    /// The authenticated caller and scope (CallerAuth).
    pub caller: Option<Caller>,
}

static EMPTY: RequestContext = RequestContext {
    peer: None,
    cert: None,
    route: None,
    caller: None,
};

impl RequestContext {
    /// The request's context; an empty one if no step has set anything.
    pub fn of(extensions: &Extensions) -> &RequestContext {
        extensions.get().unwrap_or(&EMPTY)
    }

    /// The request's context, added empty if it has none yet.
    pub fn of_mut(extensions: &mut Extensions) -> &mut RequestContext {
        extensions.get_or_insert_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_fill_one_context() {
        let mut ext = Extensions::new();
        assert!(RequestContext::of(&ext).peer.is_none());
        assert!(RequestContext::of(&ext).cert.is_none());
        let peer: SocketAddr = ([127, 0, 0, 1], 9).into();
        RequestContext::of_mut(&mut ext).peer = Some(peer);
        RequestContext::of_mut(&mut ext).cert = Some(ClientCertIdentity {
            names: vec!["svc.internal".into()],
        });
        // The second step's write kept the first one's.
        let context = RequestContext::of(&ext);
        assert_eq!(context.peer, Some(peer));
        assert_eq!(
            context.cert.as_ref().map(|c| c.names.clone()),
            Some(vec!["svc.internal".to_string()])
        );
        assert_eq!(ext.len(), 1, "one extension however many steps write");
    }
}
