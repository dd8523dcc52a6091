//! How requests reach upstreams, for both kinds of route: the peer (resolved address, TLS with
//! its name and trust, HTTP/2 by ALPN, the policy's timeouts) and the request's shape (path,
//! credentials removed, the upstream's headers, Host, one `x-request-id`, no hop-by-hop
//! headers). Plain routes go through pingora's proxy loop, LLM routes through a pingora
//! connector of the same options; both call the functions here.

use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::protocols::ALPN;
use pingora::tls::x509::X509;
use quota::policy::{Policy, Upstream};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Headers that carry the client's Tollgate key: removed before forwarding.
pub const CLIENT_CREDENTIALS: [&str; 2] = ["authorization", "x-api-key"];
/// Headers some frameworks read as the request's method: a route is matched (and billed) by the
/// method on the wire, so the upstream must not act on another.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers that belong to one connection, never forwarded as they came (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve upstream {address}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("cannot read the CA file {path} of upstream {upstream}: {reason}")]
    CaFile {
        upstream: String,
        path: String,
        reason: String,
    },
    #[error("invalid upstream request: {0}")]
    Request(String),
}

/// How long a resolved address is used before it is looked up again (in the background: the
/// old one serves meanwhile).
const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// Upstream addresses resolved once and refreshed on a TTL, and CA bundles read once: nothing
/// here touches DNS or the disk on a request's path after the first.
#[derive(Default)]
pub struct Upstreams {
    addrs: RwLock<HashMap<String, Resolved>>,
    cas: RwLock<HashMap<String, Arc<Box<[X509]>>>>,
}

#[derive(Clone, Copy)]
struct Resolved {
    addr: SocketAddr,
    at: Instant,
}

impl Upstreams {
    /// Resolve every upstream of a policy that is about to be enforced, so its first requests
    /// find their addresses ready. Failures are logged; requests will retry the lookup.
    pub async fn prepare(&self, policy: &Policy) {
        for up in policy.upstreams() {
            if up.literal.is_none()
                && let Err(e) = self.lookup(&up.address).await
            {
                tracing::warn!(upstream = %up.name, error = %e, "upstream address not resolved");
            }
            if let Err(e) = self.ca(up) {
                tracing::warn!(upstream = %up.name, error = %e, "upstream CA file not loaded");
            }
        }
    }

    /// The address of the name `address` (`host:port`), from the cache. (Literal addresses are
    /// parsed when the policy loads: `Upstream::literal`.)
    pub async fn resolve(self: &Arc<Self>, address: &str) -> Result<SocketAddr, UpstreamError> {
        let cached = self.addrs.read().ok().and_then(|m| m.get(address).copied());
        match cached {
            Some(r) if r.at.elapsed() < RESOLVE_TTL => Ok(r.addr),
            Some(r) => {
                // Stale: serve it, refresh behind this request.
                if let Ok(mut m) = self.addrs.write() {
                    // Marked fresh now so one refresh runs, not one per request.
                    m.insert(
                        address.to_string(),
                        Resolved {
                            addr: r.addr,
                            at: Instant::now(),
                        },
                    );
                }
                let me = self.clone();
                let address = address.to_string();
                tokio::spawn(async move {
                    if let Err(e) = me.lookup(&address).await {
                        tracing::warn!(%address, error = %e, "upstream address not refreshed; keeping the old one");
                    }
                });
                Ok(r.addr)
            }
            None => self.lookup(address).await,
        }
    }

    async fn lookup(&self, address: &str) -> Result<SocketAddr, UpstreamError> {
        let err = |reason: String| UpstreamError::Resolve {
            address: address.to_string(),
            reason,
        };
        let addr = tokio::net::lookup_host(address)
            .await
            .map_err(|e| err(e.to_string()))?
            .next()
            .ok_or_else(|| err("no address".into()))?;
        if let Ok(mut m) = self.addrs.write() {
            m.insert(
                address.to_string(),
                Resolved {
                    addr,
                    at: Instant::now(),
                },
            );
        }
        Ok(addr)
    }

    /// The CA bundle `up` trusts instead of the system's, read once per path.
    fn ca(&self, up: &Upstream) -> Result<Option<Arc<Box<[X509]>>>, UpstreamError> {
        let Some(path) = &up.ca_file else {
            return Ok(None);
        };
        if let Some(ca) = self.cas.read().ok().and_then(|m| m.get(path).cloned()) {
            return Ok(Some(ca));
        }
        let err = |reason: String| UpstreamError::CaFile {
            upstream: up.name.to_string(),
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let certs = X509::stack_from_pem(&pem).map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificate in the file".into()));
        }
        let ca = Arc::new(certs.into_boxed_slice());
        if let Ok(mut m) = self.cas.write() {
            m.insert(path.clone(), ca.clone());
        }
        Ok(Some(ca))
    }

    /// The peer for `up`: its address, TLS (name, verification, trust), HTTP/2 offered by ALPN
    /// on TLS, and the policy's timeouts.
    pub async fn peer(self: &Arc<Self>, up: &Upstream) -> Result<HttpPeer, UpstreamError> {
        let addr = match up.literal {
            Some(a) => a,
            None => self.resolve(&up.address).await?,
        };
        let mut peer = HttpPeer::new(addr, up.tls, up.sni.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(up.connect_timeout);
        o.read_timeout = Some(up.read_timeout);
        o.write_timeout = Some(up.write_timeout);
        o.idle_timeout = Some(up.idle_timeout);
        if up.tls {
            // h2 where the upstream offers it; HTTP/1.1 otherwise.
            o.alpn = ALPN::H2H1;
            o.verify_cert = up.tls_verify;
            o.verify_hostname = up.tls_verify;
            o.ca = self.ca(up)?;
        }
        Ok(peer)
    }
}

/// Shape `req` for `up`: origin form with a Host (an HTTP/2 client named its host in
/// `:authority`; whoever writes the request to an h2 upstream builds `:authority` from Host), the
/// path it receives (`target`; `None`: the request's own), the client's credentials and
/// hop-by-hop headers removed, the upstream's own headers, Host for TLS upstreams, and the
/// request id once. The HTTP version is the connection's business, not set here.
pub fn shape(
    req: &mut RequestHeader,
    up: &Upstream,
    target: Option<&str>,
    request_id: &str,
) -> Result<(), UpstreamError> {
    let err = |e: &dyn std::fmt::Display| UpstreamError::Request(e.to_string());
    if let Some(authority) = req.uri.authority()
        && !req.headers.contains_key(http::header::HOST)
    {
        let host = http::HeaderValue::from_str(authority.as_str()).map_err(|e| err(&e))?;
        req.insert_header(http::header::HOST, host)
            .map_err(|e| err(&e))?;
    }
    let current = req.uri.path_and_query().map(|p| p.as_str());
    let path = target.or(current).unwrap_or("/");
    if req.uri.authority().is_some() || current != Some(path) {
        let uri = http::Uri::builder()
            .path_and_query(path)
            .build()
            .map_err(|e| err(&e))?;
        req.set_uri(uri);
    }
    // Headers the client named in `Connection` are hop-by-hop too.
    let named: Vec<String> = req
        .headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for h in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
        // The body's framing stays: pingora forwards the body as it was framed.
        if h != "transfer-encoding" && h != "content-length" {
            req.remove_header(h);
        }
    }
    for h in CLIENT_CREDENTIALS.into_iter().chain(METHOD_OVERRIDES) {
        req.remove_header(h);
    }
    for (name, value) in &up.headers {
        req.insert_header(name.clone(), value.clone())
            .map_err(|e| err(&e))?;
    }
    if up.tls {
        req.insert_header(http::header::HOST, up.host.clone())
            .map_err(|e| err(&e))?;
    }
    let rid = http::HeaderValue::from_str(request_id).map_err(|e| err(&e))?;
    req.insert_header("x-request-id", rid).map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::upstreams::peer::Peer;

    fn upstream(tls: bool) -> Upstream {
        Upstream {
            name: "u".into(),
            address: "127.0.0.1:1".into(),
            literal: Some("127.0.0.1:1".parse().unwrap()),
            tls,
            sni: "api.example.com".into(),
            host: http::HeaderValue::from_static("api.example.com"),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            tls_verify: true,
            ca_file: None,
            base_path: String::new(),
            headers: vec![(
                http::HeaderName::from_static("x-api-key"),
                http::HeaderValue::from_static("upstream-secret"),
            )],
            unresolved: None,
        }
    }

    #[test]
    fn shaping_removes_credentials_and_hop_headers_and_sets_one_request_id() {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (n, v) in [
            ("authorization", "Bearer client-key"),
            ("x-api-key", "client-key"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "hop"),
            ("keep-alive", "timeout=5"),
            ("x-request-id", "from-client"),
            ("content-length", "12"),
            ("host", "gateway.local"),
        ] {
            req.append_header(n, v).unwrap();
        }
        shape(
            &mut req,
            &upstream(true),
            Some("/base/v1/chat/completions?x=1"),
            "rid-1",
        )
        .unwrap();
        let h = &req.headers;
        assert_eq!(req.uri.to_string(), "/base/v1/chat/completions?x=1");
        assert!(h.get("authorization").is_none());
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
        assert_eq!(h["x-api-key"], "upstream-secret");
        for gone in ["connection", "x-private", "keep-alive"] {
            assert!(h.get(gone).is_none(), "{gone} forwarded");
        }
        assert_eq!(h.get_all("x-request-id").iter().count(), 1);
        assert_eq!(h["x-request-id"], "rid-1");
        assert_eq!(h["content-length"], "12");
        assert_eq!(h["host"], "api.example.com");
    }

    #[test]
    fn plain_text_upstreams_keep_the_clients_host() {
        let mut req = RequestHeader::build("GET", b"/lookup", None).unwrap();
        req.append_header("host", "gateway.local").unwrap();
        shape(&mut req, &upstream(false), None, "r").unwrap();
        assert_eq!(req.headers["host"], "gateway.local");
        assert_eq!(req.uri.to_string(), "/lookup");
    }

    #[test]
    fn an_http2_request_leaves_in_origin_form_with_its_host() {
        let mut req = RequestHeader::build("POST", b"/v1/messages", None).unwrap();
        req.set_uri(
            "https://gateway.local:8443/v1/messages?beta=1"
                .parse()
                .unwrap(),
        );
        req.set_version(http::Version::HTTP_2);
        shape(&mut req, &upstream(false), None, "r").unwrap();
        assert_eq!(req.uri.to_string(), "/v1/messages?beta=1");
        assert_eq!(req.headers["host"], "gateway.local:8443");
    }

    #[tokio::test]
    async fn names_resolve_once_and_literals_never() {
        let ups = Arc::new(Upstreams::default());
        let peer = ups.peer(&upstream(false)).await.unwrap();
        assert_eq!(peer.address().to_string(), "127.0.0.1:1");
        assert!(ups.addrs.read().unwrap().is_empty());
        let b = ups.resolve("localhost:8080").await.unwrap();
        assert_eq!(b.port(), 8080);
        assert!(ups.addrs.read().unwrap().contains_key("localhost:8080"));
        assert!(ups.resolve("no-such-host.invalid:80").await.is_err());
    }
}
