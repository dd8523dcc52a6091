//! The admin console, served by `control-plane serve` under `/console`: server-rendered pages
//! (maud) that work without JavaScript, charts as server-side SVG, the stylesheet compiled into
//! the binary. Pages: Overview (requests, refusals, tokens and spend over time; today's top
//! subjects), Subjects (search, keys, tier, usage against limits, recent refusals), Policies
//! (history, diff, an editor validated by the API's own dry run, publish, rollback), Gateways
//! (open watch streams) and Changes (the change log).
//!
//! Reads come from the store and the ledger; every change goes through the API's one write path
//! (`write::apply` and the API's helpers), so roles, validation, the change log and audit events
//! are the API's. Sign-in is with a control-plane token (see `session`); a page shows only the
//! controls the role may use, and the write path checks the role again.

mod chart;
mod pages;
pub mod session;

use crate::api;
use crate::auth::{Actor, Role};
use crate::error::ApiError;
use crate::ledger::Ledger;
use crate::state::AppState;
use crate::usage::{self, Kinds, Range};
use crate::write::{self, Entitlement, Op, Outcome};
use axum::Router;
use axum::extract::{Form, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use session::{LOGIN_COOKIE, SESSION_COOKIE, Sessions, Signed};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

/// What the console's handlers share.
pub struct Console {
    pub state: Arc<AppState>,
    pub sessions: Sessions,
    /// Where the charts' history is; without it the pages that chart say so.
    pub ledger: Option<Ledger>,
}

impl Console {
    pub fn new(state: Arc<AppState>, ledger: Option<Ledger>, session_ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            state,
            sessions: Sessions::new(session_ttl),
            ledger,
        })
    }
}

const CSS: &str = include_str!("console.css");

pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::to("/console/overview") }),
        )
        .route(
            "/console/",
            get(|| async { Redirect::to("/console/overview") }),
        )
        .route("/console/assets/console.css", get(css))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route("/console/overview", get(overview))
        .route("/console/subjects", get(subjects))
        .route("/console/subjects/{id}", get(subject))
        .route("/console/subjects/{id}/tier", post(change_tier))
        .route("/console/subjects/{id}/keys", post(issue_key))
        .route("/console/subjects/{id}/keys/{key}/revoke", post(revoke_key))
        .route("/console/policies", get(policies))
        .route("/console/policies/diff", get(policy_diff))
        .route("/console/policies/edit", get(policy_editor))
        .route("/console/policies/validate", post(policy_validate))
        .route("/console/policies/publish", post(policy_publish))
        .route(
            "/console/policies/{version}/rollback",
            post(policy_rollback),
        )
        .route("/console/gateways", get(gateways))
        .route("/console/changes", get(changes))
        .layer(axum::middleware::from_fn(secure_cookies_behind_tls))
        .with_state(console)
}

/// Behind a TLS terminator (`X-Forwarded-Proto: https`), every cookie the console sets is
/// `Secure`: the browser then never sends the session over plain HTTP. (Served directly, the
/// console speaks plain HTTP, where a `Secure` cookie would not be kept.)
async fn secure_cookies_behind_tls(req: Request, next: axum::middleware::Next) -> Response {
    let https = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    let mut resp = next.run(req).await;
    if https {
        let secure: Vec<HeaderValue> = resp
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| HeaderValue::from_str(&format!("{v}; Secure")).ok())
            .collect();
        resp.headers_mut().remove(header::SET_COOKIE);
        for v in secure {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

/// An HTML page with the console's security headers: no framing, no inline scripts or styles,
/// nothing from elsewhere, never cached.
fn html(status: StatusCode, body: Markup) -> Response {
    let mut r = (status, body.into_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// An error as a page (an internal error's cause goes to the log only, under an id).
fn error_page(who: Option<&Signed>, e: ApiError) -> Response {
    let status = e.status();
    let message = match (&e, e.public_detail()) {
        (ApiError::Invalid { detail, errors }, _) => format!("{detail}: {}", errors.join("; ")),
        (_, (message, Some(id))) => format!("{message} ({id})"),
        (_, (message, None)) => message,
    };
    html(status, pages::error(who, status, &message))
}

/// Refused before anything is read: no session, a forged form, or a role that may not.
fn forbidden(who: Option<&Signed>, why: &str) -> Response {
    html(
        StatusCode::FORBIDDEN,
        pages::error(who, StatusCode::FORBIDDEN, why),
    )
}

impl FromRequestParts<Arc<Console>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        c: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        // Reads go to the sign-in page; anything else is refused outright.
        let refuse = |m: &Method| {
            if m == Method::GET || m == Method::HEAD {
                see_other("/console/login")
            } else {
                forbidden(None, "sign in first")
            }
        };
        let Some(id) = session::cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(refuse(&parts.method));
        };
        let s = match c.sessions.get(&c.state.store, id).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err(refuse(&parts.method)),
            Err(e) => return Err(error_page(None, e.into())),
        };
        // The token is checked on every request: revoking it ends its sessions.
        match crate::auth::verify_hashed(&c.state, &s.token_id, &s.token_sha256).await {
            Ok(actor) => Ok(Signed {
                actor,
                csrf: s.csrf,
                id: id.to_string(),
            }),
            Err(ApiError::Unauthorized) => {
                if let Err(e) = c.sessions.close(&c.state.store, id).await {
                    tracing::warn!(error = %e, "closing a session of a revoked token failed");
                }
                Err(refuse(&parts.method))
            }
            Err(e) => Err(error_page(None, e)),
        }
    }
}

/// A state-changing console request: signed in, its form's CSRF token and origin checked, then
/// the role `R` — every POST handler takes one, so none can skip a check.
struct Posted<F, R> {
    who: Signed,
    form: F,
    role: PhantomData<R>,
}

/// The least role a `Posted` request needs.
trait Needs {
    const ROLE: Role;
}

/// Any signed-in role (signing out).
struct AnyRole;
impl Needs for AnyRole {
    const ROLE: Role = Role::Viewer;
}

struct EditorRole;
impl Needs for EditorRole {
    const ROLE: Role = Role::Editor;
}

/// A console form: each carries the session's CSRF token.
trait CsrfField {
    fn csrf(&self) -> Option<&str>;
}

impl<F, R> FromRequest<Arc<Console>> for Posted<F, R>
where
    F: DeserializeOwned + CsrfField + Send,
    R: Needs,
{
    type Rejection = Response;

    async fn from_request(req: Request, c: &Arc<Console>) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let who = Signed::from_request_parts(&mut parts, c).await?;
        let headers = parts.headers.clone();
        let Form(form) = Form::<F>::from_request(Request::from_parts(parts, body), c)
            .await
            .map_err(IntoResponse::into_response)?;
        if !session::csrf_ok(&who.csrf, form.csrf(), &headers) {
            return Err(forbidden(
                Some(&who),
                "the form's CSRF token is missing or wrong (or it was sent from another site)",
            ));
        }
        if who.actor.require(R::ROLE).is_err() {
            let why = format!("this needs the `{}` role", R::ROLE.name());
            return Err(forbidden(Some(&who), &why));
        }
        Ok(Self {
            who,
            form,
            role: PhantomData,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Sign-in

#[derive(Deserialize, Default)]
#[serde(default)]
struct LoginForm {
    token: String,
    csrf: Option<String>,
}

async fn login_form() -> Response {
    login_page(StatusCode::OK, None)
}

fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    let csrf = crate::auth::random_secret();
    let mut r = html(status, pages::login(&csrf, message));
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
        LOGIN_COOKIE,
        &csrf,
        Duration::from_secs(600),
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

async fn login(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let expected = session::cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !session::csrf_ok(expected, f.csrf.as_deref(), &headers) {
        return forbidden(
            None,
            "the sign-in form's CSRF token is missing or wrong: open the sign-in page again",
        );
    }
    let token = f.token.trim().to_string();
    match crate::auth::verify(&c.state, &token).await {
        Ok(actor) if !actor.role.permits(Role::Viewer) => forbidden(
            None,
            "a billing token only posts entitlements: sign in with a viewer, editor or admin token",
        ),
        Ok(actor) => {
            let id = match c.sessions.open(&c.state.store, &token).await {
                Ok(id) => id,
                Err(e) => return error_page(None, e.into()),
            };
            tracing::info!(actor = %actor.name, role = actor.role.name(), "console sign-in");
            let mut r = see_other("/console/overview");
            for cookie in [
                session::set_cookie(SESSION_COOKIE, &id, c.sessions.ttl()),
                session::set_cookie(LOGIN_COOKIE, "", Duration::ZERO),
            ] {
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    r.headers_mut().append(header::SET_COOKIE, v);
                }
            }
            r
        }
        Err(ApiError::Unauthorized) => login_page(
            StatusCode::UNAUTHORIZED,
            Some("that token is not a valid control-plane token"),
        ),
        Err(e) => error_page(None, e),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CsrfForm {
    csrf: Option<String>,
}

impl CsrfField for CsrfForm {
    fn csrf(&self) -> Option<&str> {
        self.csrf.as_deref()
    }
}

async fn logout(
    State(c): State<Arc<Console>>,
    Posted { who, .. }: Posted<CsrfForm, AnyRole>,
) -> Response {
    if let Err(e) = c.sessions.close(&c.state.store, &who.id).await {
        return error_page(None, e.into());
    }
    let mut r = see_other("/console/login");
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(SESSION_COOKIE, "", Duration::ZERO)) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Overview

#[derive(Deserialize, Default)]
#[serde(default)]
struct RangeQuery {
    range: Option<String>,
}

/// Token and spend quota types of the active policy (none before the first policy).
async fn kinds(state: &AppState) -> Kinds {
    match api::active_compiled(state).await {
        Ok(p) => Kinds::of(&p),
        Err(_) => Kinds::default(),
    }
}

fn ledger_error(e: sqlx::Error) -> ApiError {
    ApiError::Internal(format!("ledger: {e}"))
}

async fn overview(
    State(c): State<Arc<Console>>,
    who: Signed,
    Query(q): Query<RangeQuery>,
) -> Response {
    let range = q
        .range
        .as_deref()
        .and_then(Range::parse)
        .unwrap_or(Range::Day);
    let Some(ledger) = &c.ledger else {
        return html(StatusCode::OK, pages::overview(&who, range, None));
    };
    let now = chrono::Utc::now();
    let kinds = kinds(&c.state).await;
    let data = async {
        let o = usage::overview(ledger.pool(), &kinds, range, now, None).await?;
        let top = usage::top_today(ledger.pool(), &kinds, now, 10).await?;
        Ok::<_, sqlx::Error>((o, top))
    }
    .await;
    match data {
        Ok(d) => html(StatusCode::OK, pages::overview(&who, range, Some(&d))),
        Err(e) => error_page(Some(&who), ledger_error(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// Subjects

#[derive(Deserialize, Default)]
#[serde(default)]
struct SearchQuery {
    q: Option<String>,
}

async fn subjects(
    State(c): State<Arc<Console>>,
    who: Signed,
    Query(q): Query<SearchQuery>,
) -> Response {
    let all = match c.state.store.subjects().await {
        Ok(s) => s,
        Err(e) => return error_page(Some(&who), e.into()),
    };
    let needle = q.q.unwrap_or_default().trim().to_lowercase();
    let shown: Vec<_> = all
        .into_iter()
        .filter(|s| {
            needle.is_empty()
                || s.id.to_lowercase().contains(&needle)
                || s.tier.to_lowercase().contains(&needle)
        })
        .take(500)
        .collect();
    html(StatusCode::OK, pages::subjects(&who, &needle, &shown))
}

/// A limit of a subject's quota type with its use in the current window.
pub struct LimitUse {
    pub quota: String,
    pub window: &'static str,
    pub limit: u64,
    pub used: i128,
    /// When the window resets, in the subject's time zone.
    pub resets: String,
}

/// The subject's calendar limits (its tier with its overrides, as the gateway compiles them) and
/// what the ledger says it used of each in the current day and month of its time zone.
async fn limits(
    state: &AppState,
    ledger: Option<&Ledger>,
    id: &str,
) -> Result<Vec<LimitUse>, ApiError> {
    use chrono::Datelike;
    use quota::calendar::CalendarPeriod;
    use quota::policy::{LimitSpec, QuotaLimits};
    let mut snap = state.store.snapshot().await?;
    snap.subjects.retain(|s| s.id == id);
    for s in &mut snap.subjects {
        // A keyless subject is compiled with a stand-in key, as the write path's check does.
        if s.key_sha256.is_empty() {
            s.key_sha256.push(crate::auth::sha256_hex(
                format!("stand-in key of {id}").as_bytes(),
            ));
        }
    }
    let policy = crate::state::validate(snap).await?;
    let Some(subject) = policy.subject_by_id(id) else {
        return Ok(Vec::new());
    };
    let tz = subject.time_zone;
    let now = chrono::Utc::now().with_timezone(&tz);
    let today = now.date_naive();
    let month_start = today.with_day0(0).unwrap_or(today);
    let tomorrow = today.succ_opt().unwrap_or(today);
    let next_month = month_start
        .checked_add_months(chrono::Months::new(1))
        .unwrap_or(today);
    let used = match ledger {
        Some(l) => usage::days(
            l.pool(),
            id,
            &month_start.format("%Y-%m-%d").to_string(),
            &today.format("%Y-%m-%d").to_string(),
        )
        .await
        .map_err(ledger_error)?,
        None => Default::default(),
    };
    let today_s = today.format("%Y-%m-%d").to_string();
    let local_midnight = |d: chrono::NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .and_then(|t| t.and_local_timezone(tz).earliest())
            .map_or_else(
                || d.to_string(),
                |t| t.format("%Y-%m-%d %H:%M %Z").to_string(),
            )
    };
    let mut out = Vec::new();
    let mut quotas: Vec<_> = subject.tier.quotas.iter().collect();
    quotas.sort_by(|a, b| a.0.cmp(b.0));
    for (quota, limits) in quotas {
        let QuotaLimits::Limited(specs) = limits else {
            continue;
        };
        for spec in specs {
            if let LimitSpec::Calendar { limit, period } = spec {
                let (window, used, resets) = match period {
                    CalendarPeriod::Day => (
                        "day",
                        used.get(&(quota.to_string(), today_s.clone()))
                            .copied()
                            .unwrap_or(0),
                        local_midnight(tomorrow),
                    ),
                    CalendarPeriod::Month => (
                        "month",
                        used.iter()
                            .filter(|((q, _), _)| q.as_str() == &**quota)
                            .map(|(_, v)| *v)
                            .sum(),
                        local_midnight(next_month),
                    ),
                };
                out.push(LimitUse {
                    quota: quota.to_string(),
                    window,
                    limit: *limit,
                    used,
                    resets,
                });
            }
        }
    }
    Ok(out)
}

async fn subject(State(c): State<Arc<Console>>, who: Signed, Path(id): Path<String>) -> Response {
    let s = match c.state.store.subject(&id).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return error_page(Some(&who), ApiError::NotFound(format!("no subject `{id}`")));
        }
        Err(e) => return error_page(Some(&who), e.into()),
    };
    let tiers = match api::active_compiled(&c.state).await {
        Ok(p) => {
            let mut t: Vec<String> = p.tiers.keys().cloned().collect();
            t.sort();
            t
        }
        Err(_) => Vec::new(),
    };
    let limits = match limits(&c.state, c.ledger.as_ref(), &id).await {
        Ok(l) => l,
        Err(e) => return error_page(Some(&who), e),
    };
    let now = chrono::Utc::now();
    let history = match &c.ledger {
        Some(l) => {
            let data = async {
                let charts = usage::per_quota(l.pool(), Range::Month, now, &id).await?;
                let refusals = usage::recent_refusals(l.pool(), &id, now, 20).await?;
                Ok::<_, sqlx::Error>((charts, refusals))
            }
            .await;
            match data {
                Ok(d) => Some(d),
                Err(e) => return error_page(Some(&who), ledger_error(e)),
            }
        }
        None => None,
    };
    html(
        StatusCode::OK,
        pages::subject(&who, &s, &tiers, &limits, history.as_ref()),
    )
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TierForm {
    tier: String,
    csrf: Option<String>,
}

impl CsrfField for TierForm {
    fn csrf(&self) -> Option<&str> {
        self.csrf.as_deref()
    }
}

/// A tier change: the same entitlement write as the payment webhook's.
async fn change_tier(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
    Posted { who, form: f, .. }: Posted<TierForm, EditorRole>,
) -> Response {
    let op = Op::Entitlement(Entitlement {
        subject: id.clone(),
        tier: f.tier.trim().to_string(),
        time_zone: None,
        idempotency: None,
        event_ms: None,
    });
    match write::apply(&c.state, &who.actor, op).await {
        Ok(_) => see_other(&format!("/console/subjects/{}", path_part(&id))),
        Err(e) => error_page(Some(&who), e),
    }
}

async fn issue_key(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
    Posted { who, .. }: Posted<CsrfForm, EditorRole>,
) -> Response {
    match write::apply(&c.state, &who.actor, Op::IssueKey { subject: id }).await {
        Ok(Outcome::Key(k)) => html(StatusCode::CREATED, pages::new_key(&who, &k)),
        Ok(_) => error_page(
            Some(&who),
            ApiError::Internal("a key write answered otherwise".into()),
        ),
        Err(e) => error_page(Some(&who), e),
    }
}

async fn revoke_key(
    State(c): State<Arc<Console>>,
    Path((id, key)): Path<(String, String)>,
    Posted { who, .. }: Posted<CsrfForm, EditorRole>,
) -> Response {
    let op = Op::RevokeKey {
        subject: id.clone(),
        key_id: key,
    };
    match write::apply(&c.state, &who.actor, op).await {
        Ok(_) => see_other(&format!("/console/subjects/{}", path_part(&id))),
        Err(e) => error_page(Some(&who), e),
    }
}

/// A name as one URL path segment (subject ids are checked names, but stay safe anyway).
pub(crate) fn path_part(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Policies

#[derive(Deserialize, Default)]
#[serde(default)]
struct PoliciesQuery {
    published: Option<u64>,
}

async fn policies(
    State(c): State<Arc<Console>>,
    who: Signed,
    Query(q): Query<PoliciesQuery>,
) -> Response {
    match c.state.store.policy_history().await {
        Ok(h) => html(StatusCode::OK, pages::policies(&who, &h, q.published)),
        Err(e) => error_page(Some(&who), e.into()),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DiffQuery {
    from: String,
    to: Option<String>,
}

async fn policy_diff(
    State(c): State<Arc<Console>>,
    who: Signed,
    Query(q): Query<DiffQuery>,
) -> Response {
    let to = q.to.as_deref().filter(|t| !t.is_empty());
    match api::diff(&c.state, &q.from, to).await {
        Ok((from, to, diff)) => html(StatusCode::OK, pages::diff(&who, from, to, &diff)),
        Err(e) => error_page(Some(&who), e),
    }
}

/// What the editor shows below the text: nothing yet, a passed dry run, or the errors.
pub enum Checked {
    None,
    Valid(serde_json::Value),
    Invalid { detail: String, errors: Vec<String> },
}

async fn policy_editor(State(c): State<Arc<Console>>, who: Signed) -> Response {
    if who.actor.require(Role::Editor).is_err() {
        return forbidden(Some(&who), "editing policies needs the `editor` role");
    }
    let yaml = match c.state.store.active_policy().await {
        Ok(p) => p.and_then(|p| p.yaml).unwrap_or_default(),
        Err(e) => return error_page(Some(&who), e.into()),
    };
    html(
        StatusCode::OK,
        pages::editor(&who, &yaml, "", &Checked::None),
    )
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PolicyForm {
    yaml: String,
    comment: String,
    csrf: Option<String>,
}

impl CsrfField for PolicyForm {
    fn csrf(&self) -> Option<&str> {
        self.csrf.as_deref()
    }
}

/// The browser sends CR LF line ends from a text area; the stored document keeps LF.
fn normalize(yaml: &str) -> String {
    yaml.replace("\r\n", "\n")
}

async fn policy_validate(
    State(c): State<Arc<Console>>,
    Posted { who, form: f, .. }: Posted<PolicyForm, EditorRole>,
) -> Response {
    let yaml = normalize(&f.yaml);
    let (status, checked) = match api::dry_run(&c.state, yaml.clone()).await {
        Ok(v) => (StatusCode::OK, Checked::Valid(v)),
        Err(ApiError::Invalid { detail, errors }) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Checked::Invalid { detail, errors },
        ),
        Err(e) => return error_page(Some(&who), e),
    };
    html(status, pages::editor(&who, &yaml, &f.comment, &checked))
}

async fn policy_publish(
    State(c): State<Arc<Console>>,
    Posted { who, form: f, .. }: Posted<PolicyForm, EditorRole>,
) -> Response {
    let yaml = normalize(&f.yaml);
    if yaml.trim().is_empty() {
        return error_page(
            Some(&who),
            ApiError::BadRequest("the policy is empty".into()),
        );
    }
    match api::put_policy(
        &c.state,
        &who.actor,
        yaml.clone(),
        f.comment.trim().to_string(),
    )
    .await
    {
        Ok(v) => see_other(&format!("/console/policies?published={}", v.version)),
        Err(ApiError::Invalid { detail, errors }) => html(
            StatusCode::UNPROCESSABLE_ENTITY,
            pages::editor(
                &who,
                &yaml,
                &f.comment,
                &Checked::Invalid { detail, errors },
            ),
        ),
        Err(e) => error_page(Some(&who), e),
    }
}

async fn policy_rollback(
    State(c): State<Arc<Console>>,
    Path(version): Path<String>,
    Posted { who, .. }: Posted<CsrfForm, EditorRole>,
) -> Response {
    match api::rollback(&c.state, &who.actor, &version).await {
        Ok(v) => see_other(&format!("/console/policies?published={}", v.version)),
        Err(e) => error_page(Some(&who), e),
    }
}

// ---------------------------------------------------------------------------------------------
// Gateways and changes

async fn gateways(State(c): State<Arc<Console>>, who: Signed) -> Response {
    let published = c.state.published.borrow().revision;
    let stored = match c.state.store.revision().await {
        Ok(r) => r,
        Err(e) => return error_page(Some(&who), e.into()),
    };
    html(
        StatusCode::OK,
        pages::gateways(&who, published, stored, &c.state.gateways.list()),
    )
}

async fn changes(State(c): State<Arc<Console>>, who: Signed) -> Response {
    match c.state.store.changes(200).await {
        Ok(ch) => html(StatusCode::OK, pages::changes(&who, &ch)),
        Err(e) => error_page(Some(&who), e.into()),
    }
}

/// Whether `actor` may change things (the pages show edit controls only then).
pub(crate) fn can_edit(actor: &Actor) -> bool {
    actor.role.permits(Role::Editor)
}
