//! Console sessions: signing in with a control-plane token opens a session held in this
//! process's memory; the browser gets only its random id, in an HttpOnly, SameSite=Strict cookie.
//! Each session has its own CSRF token that every state-changing form carries; it expires a
//! fixed time after sign-in, and each request checks the token again, so a revoked token ends its
//! sessions at once. The sign-in form, before any session, carries a CSRF token of its own bound
//! to a short-lived cookie.

use crate::auth::{Actor, constant_time_eq, random_secret};
use axum::http::{HeaderMap, header};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const SESSION_COOKIE: &str = "tg_session";
pub const LOGIN_COOKIE: &str = "tg_login";

/// A signed-in browser.
#[derive(Clone)]
pub struct Session {
    /// The control-plane token it signed in with (kept here only, never sent back).
    pub token: String,
    pub csrf: String,
    pub expires: Instant,
}

/// The signed-in user of a request.
#[derive(Debug, Clone)]
pub struct Signed {
    pub actor: Actor,
    pub csrf: String,
    pub id: String,
}

pub struct Sessions {
    ttl: Duration,
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Open a session for `token` (already verified); returns its id.
    pub fn open(&self, token: String) -> String {
        let id = random_secret();
        let now = Instant::now();
        let mut open = self.lock();
        open.retain(|_, s| s.expires > now);
        open.insert(
            id.clone(),
            Session {
                token,
                csrf: random_secret(),
                expires: now + self.ttl,
            },
        );
        id
    }

    /// The live session `id`, if any (an expired one is removed).
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut open = self.lock();
        match open.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                open.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, id: &str) {
        self.lock().remove(id);
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

    #[test]
    fn sessions_expire() {
        let s = Sessions::new(Duration::from_millis(0));
        let id = s.open("token".into());
        assert!(s.get(&id).is_none());
        let s = Sessions::new(Duration::from_secs(60));
        let id = s.open("token".into());
        assert!(s.get(&id).is_some());
        s.close(&id);
        assert!(s.get(&id).is_none());
    }
}
