//! Console sessions: signing in with a control-plane token opens a session kept in the control
//! plane's database, so every instance sharing it knows the session (a fleet behind one load
//! balancer signs a browser in once). The browser gets only a random id, in an HttpOnly,
//! SameSite=Strict cookie; the database keeps that id's hash and the token's id and hash, never
//! the token. Each session has its own CSRF token that every state-changing form carries; it
//! expires a fixed time after sign-in, and each request checks the token again, so a revoked
//! token ends its sessions at once. The sign-in form, before any session, carries a CSRF token
//! of its own bound to a short-lived cookie.

use crate::auth::{Actor, constant_time_eq, random_secret, sha256_hex, token_fingerprint};
use crate::store::{Store, StoreError, StoredSession};
use axum::http::{HeaderMap, header};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const SESSION_COOKIE: &str = "tg_session";
pub const LOGIN_COOKIE: &str = "tg_login";

/// The signed-in user of a request.
#[derive(Debug, Clone)]
pub struct Signed {
    pub actor: Actor,
    pub csrf: String,
    pub id: String,
}

pub struct Sessions {
    ttl: Duration,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Open a session for `token` (already verified); returns its id, the cookie's value.
    pub async fn open(&self, store: &Store, token: &str) -> Result<String, StoreError> {
        let id = random_secret();
        let (token_id, token_sha256) = token_fingerprint(token);
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        store
            .session_open(&StoredSession {
                id_sha256: sha256_hex(id.as_bytes()),
                token_id,
                token_sha256,
                csrf: random_secret(),
                expires_at_ms: now_ms().saturating_add(ttl_ms),
            })
            .await?;
        Ok(id)
    }

    /// The live session `id`, if any.
    pub async fn get(&self, store: &Store, id: &str) -> Result<Option<StoredSession>, StoreError> {
        store.session(&sha256_hex(id.as_bytes())).await
    }

    pub async fn close(&self, store: &Store, id: &str) -> Result<(), StoreError> {
        store.session_close(&sha256_hex(id.as_bytes())).await
    }
}

/// The value of cookie `name` in a request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, for the console's paths.
pub fn set_cookie(name: &str, value: &str, max_age: Duration) -> String {
    format!(
        "{name}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
        max_age.as_secs()
    )
}

/// Whether a form's CSRF token is the expected one, and the request, when the browser says where
/// it comes from, comes from this origin.
pub fn csrf_ok(expected: &str, presented: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    if !constant_time_eq(expected.as_bytes(), presented.as_bytes()) {
        return false;
    }
    same_origin(headers)
}

/// `Origin` (sent by browsers on POST) names this host, or is absent. `Sec-Fetch-Site`, when
/// sent, says same-origin.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, h)| !host.is_empty() && h == host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cookies_are_found_by_name() {
        let h = headers(&[("cookie", "a=1; tg_session=abc; b=2")]);
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn csrf_needs_the_token_and_this_origin() {
        let same = headers(&[
            ("host", "127.0.0.1:7070"),
            ("origin", "http://127.0.0.1:7070"),
        ]);
        assert!(csrf_ok("t0k", Some("t0k"), &same));
        assert!(!csrf_ok("t0k", Some("t0x"), &same));
        assert!(!csrf_ok("t0k", None, &same));
        let other = headers(&[
            ("host", "127.0.0.1:7070"),
            ("origin", "http://evil.example"),
        ]);
        assert!(!csrf_ok("t0k", Some("t0k"), &other));
        let cross = headers(&[("sec-fetch-site", "cross-site")]);
        assert!(!csrf_ok("t0k", Some("t0k"), &cross));
    }
}
