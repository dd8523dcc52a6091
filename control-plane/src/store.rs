//! The control plane's database: policy versions, subjects, API keys, admin tokens, the change log
//! and webhook idempotency records. One code path for SQLite (the embedded default) and
//! PostgreSQL, chosen by the URL; the schema is created at start.
//!
//! Every write runs in one transaction that also appends to `changes`, whose primary key is the
//! revision: two writers that raced for the same revision cannot both commit. On PostgreSQL the
//! transaction first takes an advisory lock, so any number of control-plane processes sharing the
//! database write one at a time, and announces its revision with `NOTIFY` at commit.

use crate::error::ApiError;
use quota::policy::{PolicyDoc, Snapshot, SubjectEntry};
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Row};
use std::collections::BTreeMap;
use utoipa::ToSchema;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS changes (
        revision BIGINT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL,
        actor TEXT NOT NULL, at_ms BIGINT NOT NULL, detail TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS policy_versions (
        version BIGINT PRIMARY KEY, revision BIGINT NOT NULL, yaml TEXT NOT NULL,
        sha256 TEXT NOT NULL, label TEXT NOT NULL, comment TEXT NOT NULL,
        actor TEXT NOT NULL, created_at_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS subjects (
        id TEXT PRIMARY KEY, tier TEXT NOT NULL, time_zone TEXT NOT NULL,
        overrides TEXT NOT NULL, enabled BIGINT NOT NULL, revision BIGINT NOT NULL,
        updated_by TEXT NOT NULL, updated_at_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY, subject_id TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL, created_by TEXT NOT NULL, created_at_ms BIGINT NOT NULL,
        revoked_at_ms BIGINT)",
    "CREATE TABLE IF NOT EXISTS admin_tokens (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, sha256 TEXT NOT NULL,
        created_by TEXT NOT NULL, created_at_ms BIGINT NOT NULL, revoked_at_ms BIGINT)",
    "CREATE TABLE IF NOT EXISTS entitlement_requests (
        idempotency_key TEXT PRIMARY KEY, request_sha256 TEXT NOT NULL,
        response TEXT NOT NULL, created_at_ms BIGINT NOT NULL)",
    // The provider's time of the newest entitlement event applied per subject: an older event
    // that arrives later must not undo it.
    "CREATE TABLE IF NOT EXISTS entitlement_events (
        subject_id TEXT PRIMARY KEY, event_ms BIGINT NOT NULL, revision BIGINT NOT NULL)",
    // Hashes of bootstrap tokens that were rotated or revoked: never accepted again at start.
    "CREATE TABLE IF NOT EXISTS retired_tokens (
        sha256 TEXT PRIMARY KEY, retired_at_ms BIGINT NOT NULL)",
    // Console sessions, shared by every instance on the database: a browser signed in through
    // one is signed in through all. Keyed by the hash of the session id (the cookie is a bearer
    // secret); the token it signed in with is kept as its id and hash only.
    "CREATE TABLE IF NOT EXISTS console_sessions (
        id_sha256 TEXT PRIMARY KEY, token_id TEXT NOT NULL, token_sha256 TEXT NOT NULL,
        csrf TEXT NOT NULL, expires_at_ms BIGINT NOT NULL)",
];

/// The PostgreSQL channel a committed revision is announced on.
pub const REVISION_CHANNEL: &str = "tollgate_revisions";
/// The advisory lock every writer holds for its transaction (an arbitrary fixed number).
const WRITE_LOCK_KEY: i64 = 7_467_265_310;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// The URL, for the PostgreSQL notification listener (never logged: it may hold a password).
    url: String,
    postgres: bool,
}

/// A token as stored: enough to verify a presented one.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub name: String,
    pub role: String,
    pub sha256: String,
    pub created_by: String,
}

/// A console session as stored.
#[derive(Debug, Clone)]
pub struct StoredSession {
    pub id_sha256: String,
    /// The token it signed in with: its id and hash, checked again on every request.
    pub token_id: String,
    pub token_sha256: String,
    pub csrf: String,
    pub expires_at_ms: i64,
}

/// A policy version as listed in its history.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PolicyVersion {
    pub version: u64,
    /// The revision at which it became active.
    pub revision: u64,
    /// The document's own `version:` label.
    pub label: String,
    pub sha256: String,
    pub comment: String,
    pub actor: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub yaml: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SubjectRecord {
    pub id: String,
    pub tier: String,
    pub time_zone: String,
    #[schema(value_type = Object)]
    pub overrides: BTreeMap<String, serde_json::Value>,
    pub enabled: bool,
    pub revision: u64,
    pub updated_by: String,
    pub updated_at: String,
    pub keys: Vec<KeyRecord>,
}

/// An API key as listed: never the key itself, which is shown once when created.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyRecord {
    pub id: String,
    /// The key's first characters, to recognise it.
    pub prefix: String,
    pub created_by: String,
    pub created_at: String,
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_by: String,
    pub created_at: String,
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Change {
    pub revision: u64,
    pub kind: String,
    pub target: String,
    pub actor: String,
    pub at: String,
    pub detail: String,
}

/// A write in progress: one transaction at the next revision.
pub struct Write<'a> {
    pub tx: sqlx::Transaction<'a, sqlx::Any>,
    pub revision: u64,
    pub now_ms: i64,
    postgres: bool,
}

pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// Connect (`sqlite://FILE`, `sqlite::memory:`, `postgres://…`) and create the schema.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") && !url.contains(":memory:") {
            // Create the file on first start.
            format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            // SQLite takes one writer at a time; an in-memory database exists per connection.
            .max_connections(if sqlite { 1 } else { 8 })
            .connect(&url)
            .await?;
        if sqlite && !url.contains(":memory:") {
            // One fsync per commit instead of several: admin writes stay durable and quick.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        for stmt in SCHEMA {
            sqlx::query(*stmt).execute(&pool).await?;
        }
        Ok(Self {
            pool,
            postgres: url.starts_with("postgres"),
            url,
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The PostgreSQL URL when the store is shared through PostgreSQL (several instances may run).
    pub fn postgres_url(&self) -> Option<&str> {
        self.postgres.then_some(self.url.as_str())
    }

    pub async fn revision(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) AS r FROM changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(u(row.try_get::<i64, _>("r")?))
    }

    /// Start a write at the next revision. The caller holds the process's write lock; on
    /// PostgreSQL the transaction also takes the database-wide advisory lock, so the revision read
    /// here (and everything read through the transaction) is still the latest when it commits,
    /// whichever instance writes.
    pub async fn begin(&self) -> Result<Write<'static>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if self.postgres {
            // Cast: the `Any` driver cannot decode `void`.
            sqlx::query("SELECT CAST(pg_advisory_xact_lock($1) AS TEXT) AS l")
                .bind(WRITE_LOCK_KEY)
                .fetch_one(&mut *tx)
                .await?;
        }
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) AS r FROM changes")
            .fetch_one(&mut *tx)
            .await?;
        let revision = u(row.try_get::<i64, _>("r")?) + 1;
        Ok(Write {
            tx,
            revision,
            now_ms: now_ms(),
            postgres: self.postgres,
        })
    }

    /// The state a gateway enforces.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Self::read_snapshot(&mut conn).await
    }

    /// The state a gateway enforces, read through `conn` (a write's transaction reads the state it
    /// changes under its lock).
    pub async fn read_snapshot(conn: &mut AnyConnection) -> Result<Snapshot, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) AS r FROM changes")
            .fetch_one(&mut *conn)
            .await?;
        let revision = u(row.try_get::<i64, _>("r")?);
        let policy = sqlx::query("SELECT * FROM policy_versions ORDER BY version DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| policy_row(&r, true))
            .transpose()?
            .map(|p| PolicyDoc {
                version: p.version,
                yaml: p.yaml.unwrap_or_default(),
            });
        let mut subjects = Vec::new();
        let mut hashes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in sqlx::query(
            "SELECT subject_id, sha256 FROM api_keys WHERE revoked_at_ms IS NULL ORDER BY id",
        )
        .fetch_all(&mut *conn)
        .await?
        {
            hashes
                .entry(row.try_get("subject_id")?)
                .or_default()
                .push(row.try_get("sha256")?);
        }
        for row in sqlx::query("SELECT * FROM subjects ORDER BY id")
            .fetch_all(&mut *conn)
            .await?
        {
            let s = subject_row(&row)?;
            subjects.push(SubjectEntry {
                key_sha256: hashes.remove(&s.id).unwrap_or_default(),
                id: s.id,
                tier: s.tier,
                time_zone: s.time_zone,
                enabled: s.enabled,
                overrides: s.overrides,
            });
        }
        Ok(Snapshot {
            revision,
            policy,
            subjects,
        })
    }

    pub async fn active_policy(&self) -> Result<Option<PolicyVersion>, StoreError> {
        let row = sqlx::query("SELECT * FROM policy_versions ORDER BY version DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| policy_row(&r, true)).transpose()
    }

    pub async fn policy(&self, version: u64) -> Result<Option<PolicyVersion>, StoreError> {
        let row = sqlx::query("SELECT * FROM policy_versions WHERE version = $1")
            .bind(version as i64)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| policy_row(&r, true)).transpose()
    }

    /// Every version without its document (which only grows: each rollback stores a copy).
    pub async fn policy_history(&self) -> Result<Vec<PolicyVersion>, StoreError> {
        sqlx::query(
            "SELECT version, revision, label, sha256, comment, actor, created_at_ms
             FROM policy_versions ORDER BY version DESC",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| policy_row(r, false))
        .collect()
    }

    pub async fn insert_policy(
        w: &mut Write<'_>,
        yaml: &str,
        label: &str,
        comment: &str,
        actor: &str,
    ) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM policy_versions")
            .fetch_one(&mut *w.tx)
            .await?;
        let version = u(row.try_get::<i64, _>("v")?) + 1;
        sqlx::query(
            "INSERT INTO policy_versions (version, revision, yaml, sha256, label, comment, actor, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(version as i64)
        .bind(w.revision as i64)
        .bind(yaml)
        .bind(crate::auth::sha256_hex(yaml.as_bytes()))
        .bind(label)
        .bind(comment)
        .bind(actor)
        .bind(w.now_ms)
        .execute(&mut *w.tx)
        .await?;
        Ok(version)
    }

    pub async fn subjects(&self) -> Result<Vec<SubjectRecord>, StoreError> {
        let mut keys = self.keys(None).await?;
        sqlx::query("SELECT * FROM subjects ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                let mut s = subject_row(r)?;
                s.keys = keys.remove(&s.id).unwrap_or_default();
                Ok(s)
            })
            .collect()
    }

    pub async fn subject(&self, id: &str) -> Result<Option<SubjectRecord>, StoreError> {
        let Some(row) = sqlx::query("SELECT * FROM subjects WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut s = subject_row(&row)?;
        s.keys = self.keys(Some(id)).await?.remove(id).unwrap_or_default();
        Ok(Some(s))
    }

    async fn keys(
        &self,
        subject: Option<&str>,
    ) -> Result<BTreeMap<String, Vec<KeyRecord>>, StoreError> {
        let rows = match subject {
            Some(id) => {
                sqlx::query(
                    "SELECT * FROM api_keys WHERE subject_id = $1 ORDER BY created_at_ms, id",
                )
                .bind(id)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query("SELECT * FROM api_keys ORDER BY created_at_ms, id")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut out: BTreeMap<String, Vec<KeyRecord>> = BTreeMap::new();
        for r in rows {
            out.entry(r.try_get("subject_id")?)
                .or_default()
                .push(KeyRecord {
                    id: r.try_get("id")?,
                    prefix: r.try_get("prefix")?,
                    created_by: r.try_get("created_by")?,
                    created_at: rfc3339_ms(r.try_get("created_at_ms")?),
                    revoked: r.try_get::<Option<i64>, _>("revoked_at_ms")?.is_some(),
                });
        }
        Ok(out)
    }

    pub async fn upsert_subject(
        w: &mut Write<'_>,
        s: &SubjectEntry,
        actor: &str,
    ) -> Result<(), StoreError> {
        let overrides = serde_json::to_string(&s.overrides).unwrap_or_else(|_| "{}".into());
        sqlx::query(
            "INSERT INTO subjects (id, tier, time_zone, overrides, enabled, revision, updated_by, updated_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET tier = $2, time_zone = $3, overrides = $4,
                enabled = $5, revision = $6, updated_by = $7, updated_at_ms = $8",
        )
        .bind(&s.id)
        .bind(&s.tier)
        .bind(&s.time_zone)
        .bind(overrides)
        .bind(i64::from(s.enabled))
        .bind(w.revision as i64)
        .bind(actor)
        .bind(w.now_ms)
        .execute(&mut *w.tx)
        .await?;
        Ok(())
    }

    pub async fn delete_subject(w: &mut Write<'_>, id: &str) -> Result<bool, StoreError> {
        sqlx::query("DELETE FROM api_keys WHERE subject_id = $1")
            .bind(id)
            .execute(&mut *w.tx)
            .await?;
        let r = sqlx::query("DELETE FROM subjects WHERE id = $1")
            .bind(id)
            .execute(&mut *w.tx)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn insert_key(
        w: &mut Write<'_>,
        subject: &str,
        id: &str,
        sha256: &str,
        prefix: &str,
        actor: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, subject_id, sha256, prefix, created_by, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(subject)
        .bind(sha256)
        .bind(prefix)
        .bind(actor)
        .bind(w.now_ms)
        .execute(&mut *w.tx)
        .await?;
        Ok(())
    }

    pub async fn revoke_key(
        w: &mut Write<'_>,
        subject: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE api_keys SET revoked_at_ms = $1
             WHERE id = $2 AND subject_id = $3 AND revoked_at_ms IS NULL",
        )
        .bind(w.now_ms)
        .bind(id)
        .bind(subject)
        .execute(&mut *w.tx)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Append to the change log at the write's revision and commit.
    pub async fn commit(
        mut w: Write<'_>,
        kind: &str,
        target: &str,
        actor: &str,
        detail: &str,
    ) -> Result<u64, StoreError> {
        sqlx::query(
            "INSERT INTO changes (revision, kind, target, actor, at_ms, detail)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(w.revision as i64)
        .bind(kind)
        .bind(target)
        .bind(actor)
        .bind(w.now_ms)
        .bind(detail)
        .execute(&mut *w.tx)
        .await?;
        if w.postgres {
            // Delivered at commit to every instance listening (a number: nothing to escape).
            let notify = format!("NOTIFY {REVISION_CHANNEL}, '{}'", w.revision);
            sqlx::query(sqlx::AssertSqlSafe(notify))
                .execute(&mut *w.tx)
                .await?;
        }
        w.tx.commit().await?;
        Ok(w.revision)
    }

    pub async fn changes(&self, limit: u32) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query("SELECT * FROM changes ORDER BY revision DESC LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Change {
                    revision: u(r.try_get("revision")?),
                    kind: r.try_get("kind")?,
                    target: r.try_get("target")?,
                    actor: r.try_get("actor")?,
                    at: rfc3339_ms(r.try_get("at_ms")?),
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// The stored answer to an earlier webhook call with this idempotency key, and the hash of
    /// that call's body; read through a write's transaction, so a retry racing the first call
    /// (through any instance) waits for it.
    pub async fn entitlement_request(
        w: &mut Write<'_>,
        key: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT request_sha256, response FROM entitlement_requests WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&mut *w.tx)
        .await?;
        row.map(|r| Ok((r.try_get("request_sha256")?, r.try_get("response")?)))
            .transpose()
    }

    pub async fn record_entitlement_request(
        w: &mut Write<'_>,
        key: &str,
        request_sha256: &str,
        response: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO entitlement_requests (idempotency_key, request_sha256, response, created_at_ms)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(key)
        .bind(request_sha256)
        .bind(response)
        .bind(w.now_ms)
        .execute(&mut *w.tx)
        .await?;
        Ok(())
    }

    /// The provider's time of the newest entitlement event applied to `subject`.
    pub async fn entitlement_event(
        w: &mut Write<'_>,
        subject: &str,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query("SELECT event_ms FROM entitlement_events WHERE subject_id = $1")
            .bind(subject)
            .fetch_optional(&mut *w.tx)
            .await?;
        Ok(row.map(|r| r.try_get("event_ms")).transpose()?)
    }

    pub async fn record_entitlement_event(
        w: &mut Write<'_>,
        subject: &str,
        event_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO entitlement_events (subject_id, event_ms, revision) VALUES ($1, $2, $3)
             ON CONFLICT (subject_id) DO UPDATE SET event_ms = $2, revision = $3",
        )
        .bind(subject)
        .bind(event_ms)
        .bind(w.revision as i64)
        .execute(&mut *w.tx)
        .await?;
        Ok(())
    }

    /// An unrevoked token by its id.
    pub async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Self::token_on(&mut conn, id).await
    }

    async fn token_on(
        conn: &mut AnyConnection,
        id: &str,
    ) -> Result<Option<StoredToken>, StoreError> {
        let row = sqlx::query(
            "SELECT name, role, sha256, created_by FROM admin_tokens
             WHERE id = $1 AND revoked_at_ms IS NULL",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|r| {
            Ok(StoredToken {
                name: r.try_get("name")?,
                role: r.try_get("role")?,
                sha256: r.try_get("sha256")?,
                created_by: r.try_get("created_by")?,
            })
        })
        .transpose()
    }

    /// An unrevoked token, read through a write's transaction.
    pub async fn live_token(
        w: &mut Write<'_>,
        id: &str,
    ) -> Result<Option<StoredToken>, StoreError> {
        Self::token_on(&mut w.tx, id).await
    }

    /// How many unrevoked admin tokens there are besides `except`.
    pub async fn other_admins(w: &mut Write<'_>, except: &str) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM admin_tokens
             WHERE role = 'admin' AND revoked_at_ms IS NULL AND id <> $1",
        )
        .bind(except)
        .fetch_one(&mut *w.tx)
        .await?;
        Ok(u(row.try_get::<i64, _>("n")?))
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        sqlx::query("SELECT * FROM admin_tokens ORDER BY created_at_ms, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(TokenRecord {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    role: r.try_get("role")?,
                    created_by: r.try_get("created_by")?,
                    created_at: rfc3339_ms(r.try_get("created_at_ms")?),
                    revoked: r.try_get::<Option<i64>, _>("revoked_at_ms")?.is_some(),
                })
            })
            .collect()
    }

    /// Insert a token; with `replace`, one with the same id is replaced (the bootstrap token).
    /// Without it an id clash is an error, never a silent takeover.
    #[allow(clippy::too_many_arguments)]
    pub async fn put_token(
        w: &mut Write<'_>,
        id: &str,
        name: &str,
        role: &str,
        sha256: &str,
        actor: &str,
        replace: bool,
    ) -> Result<(), StoreError> {
        let sql = if replace {
            "INSERT INTO admin_tokens (id, name, role, sha256, created_by, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET name = $2, role = $3, sha256 = $4, created_by = $5,
                created_at_ms = $6, revoked_at_ms = NULL"
        } else {
            "INSERT INTO admin_tokens (id, name, role, sha256, created_by, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)"
        };
        sqlx::query(sql)
            .bind(id)
            .bind(name)
            .bind(role)
            .bind(sha256)
            .bind(actor)
            .bind(w.now_ms)
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }

    pub async fn revoke_token(w: &mut Write<'_>, id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE admin_tokens SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL",
        )
        .bind(w.now_ms)
        .bind(id)
        .execute(&mut *w.tx)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Remember a bootstrap token's hash as retired: it is refused at every later start.
    pub async fn retire(w: &mut Write<'_>, sha256: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO retired_tokens (sha256, retired_at_ms) VALUES ($1, $2)
             ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(sha256)
        .bind(w.now_ms)
        .execute(&mut *w.tx)
        .await?;
        Ok(())
    }

    /// Record a console session (dropping expired ones on the way).
    pub async fn session_open(&self, s: &StoredSession) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM console_sessions WHERE expires_at_ms <= $1")
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id_sha256, token_id, token_sha256, csrf, expires_at_ms)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&s.id_sha256)
        .bind(&s.token_id)
        .bind(&s.token_sha256)
        .bind(&s.csrf)
        .bind(s.expires_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The unexpired console session whose id hashes to `id_sha256`.
    pub async fn session(&self, id_sha256: &str) -> Result<Option<StoredSession>, StoreError> {
        let row = sqlx::query(
            "SELECT token_id, token_sha256, csrf, expires_at_ms FROM console_sessions
             WHERE id_sha256 = $1 AND expires_at_ms > $2",
        )
        .bind(id_sha256)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(StoredSession {
                id_sha256: id_sha256.to_string(),
                token_id: r.try_get("token_id")?,
                token_sha256: r.try_get("token_sha256")?,
                csrf: r.try_get("csrf")?,
                expires_at_ms: r.try_get("expires_at_ms")?,
            })
        })
        .transpose()
    }

    pub async fn session_close(&self, id_sha256: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = $1")
            .bind(id_sha256)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn is_retired(&self, sha256: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM retired_tokens WHERE sha256 = $1")
            .bind(sha256)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Every stored policy document, oldest first (for the start-up rewrite of plain keys).
    pub async fn policy_documents(w: &mut Write<'_>) -> Result<Vec<(u64, String)>, StoreError> {
        sqlx::query("SELECT version, yaml FROM policy_versions ORDER BY version")
            .fetch_all(&mut *w.tx)
            .await?
            .iter()
            .map(|r| Ok((u(r.try_get("version")?), r.try_get("yaml")?)))
            .collect()
    }

    /// Replace a stored document in place (only to remove plain-text keys from it).
    pub async fn rewrite_policy_document(
        w: &mut Write<'_>,
        version: u64,
        yaml: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE policy_versions SET yaml = $1, sha256 = $2 WHERE version = $3")
            .bind(yaml)
            .bind(crate::auth::sha256_hex(yaml.as_bytes()))
            .bind(version as i64)
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }
}

fn policy_row(r: &AnyRow, with_yaml: bool) -> Result<PolicyVersion, StoreError> {
    Ok(PolicyVersion {
        version: u(r.try_get("version")?),
        revision: u(r.try_get("revision")?),
        label: r.try_get("label")?,
        sha256: r.try_get("sha256")?,
        comment: r.try_get("comment")?,
        actor: r.try_get("actor")?,
        created_at: rfc3339_ms(r.try_get("created_at_ms")?),
        yaml: if with_yaml {
            Some(r.try_get("yaml")?)
        } else {
            None
        },
    })
}

fn subject_row(r: &AnyRow) -> Result<SubjectRecord, StoreError> {
    let overrides: String = r.try_get("overrides")?;
    let id: String = r.try_get("id")?;
    let overrides = serde_json::from_str(&overrides)
        .map_err(|e| StoreError::Corrupt(format!("subject `{id}`: overrides: {e}")))?;
    Ok(SubjectRecord {
        tier: r.try_get("tier")?,
        time_zone: r.try_get("time_zone")?,
        overrides,
        enabled: r.try_get::<i64, _>("enabled")? != 0,
        revision: u(r.try_get("revision")?),
        updated_by: r.try_get("updated_by")?,
        updated_at: rfc3339_ms(r.try_get("updated_at_ms")?),
        keys: Vec::new(),
        id,
    })
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}
