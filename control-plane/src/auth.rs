//! Who is calling: bearer tokens with a role (viewer < editor < admin, and billing apart: a
//! payment provider's webhook may post entitlements and nothing else). Tokens are stored as
//! SHA-256 hashes and compared in constant time; a token is `tga_<id>_<secret>`, so the lookup is
//! by id and never by the secret. The bootstrap admin token is whatever the operator chose, under
//! the id `bootstrap`.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Entitlement changes only: the token a payment webhook holds reads nothing and cannot
    /// touch policies, keys or tokens. Declared first so no `>=` ever lets it pass as a viewer.
    Billing,
    Viewer,
    Editor,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "billing" => Some(Self::Billing),
            "viewer" => Some(Self::Viewer),
            "editor" => Some(Self::Editor),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Billing => "billing",
            Self::Viewer => "viewer",
            Self::Editor => "editor",
            Self::Admin => "admin",
        }
    }

    /// Whether a token of this role may do what needs `need`: billing may do only what needs
    /// billing, which editors and admins may do too; otherwise the higher role may.
    pub fn permits(self, need: Role) -> bool {
        match (self, need) {
            (Role::Billing, need) => need == Role::Billing,
            (have, Role::Billing) => have >= Role::Editor,
            (have, need) => have >= need,
        }
    }
}

pub const BOOTSTRAP_ID: &str = "bootstrap";

/// The authenticated caller; its name is recorded as the actor of every write.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub role: Role,
}

impl Actor {
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role.permits(role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(role.name()))
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Equal-length comparison whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A new random secret: 256 bits from the OS generator, hex.
pub fn random_secret() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{}{}", a.simple(), b.simple())
}

/// Split `tga_<id>_<secret>`; anything else is tried as the bootstrap token.
fn token_id(token: &str) -> &str {
    token
        .strip_prefix("tga_")
        .and_then(|rest| rest.split_once('_'))
        .map_or(BOOTSTRAP_ID, |(id, _)| id)
}

impl FromRequestParts<Arc<AppState>> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        verify(state, bearer(&parts.headers).ok_or(ApiError::Unauthorized)?).await
    }
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Who holds `token`, if it is a live token.
pub async fn verify(state: &AppState, token: &str) -> Result<Actor, ApiError> {
    verify_hashed(state, token_id(token), &sha256_hex(token.as_bytes())).await
}

/// `token`'s id and SHA-256, as a console session keeps them (never the token itself).
pub fn token_fingerprint(token: &str) -> (String, String) {
    (token_id(token).to_string(), sha256_hex(token.as_bytes()))
}

/// `verify` for a token known by its id and hash: still live, unrevoked, and its role.
pub async fn verify_hashed(state: &AppState, id: &str, sha256: &str) -> Result<Actor, ApiError> {
    let Some(stored) = state.store.token(id).await? else {
        return Err(ApiError::Unauthorized);
    };
    if !constant_time_eq(sha256.as_bytes(), stored.sha256.as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    let role = Role::parse(&stored.role).ok_or_else(|| {
        ApiError::Internal(format!("token `{}` has an unknown role", stored.name))
    })?;
    Ok(Actor {
        name: format!("token:{}", stored.name),
        role,
    })
}

/// Role guards as extractors: a handler that takes `Editor` runs only for an editor or admin
/// token, and gets the caller as `.0`.
macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(pub Actor);

        impl FromRequestParts<Arc<AppState>> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &Arc<AppState>,
            ) -> Result<Self, Self::Rejection> {
                let actor = Actor::from_request_parts(parts, state).await?;
                actor.require($role)?;
                Ok(Self(actor))
            }
        }
    };
}

role_extractor!(
    /// Billing, editor or admin: entitlement changes.
    Billing,
    Role::Billing
);
role_extractor!(
    /// Viewer, editor or admin: reads.
    Viewer,
    Role::Viewer
);
role_extractor!(
    /// Editor or admin: policies, subjects, keys, entitlements.
    Editor,
    Role::Editor
);
role_extractor!(
    /// Admin: tokens.
    Admin,
    Role::Admin
);
