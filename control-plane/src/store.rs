//! The control plane's database: policy versions, subjects, API keys, admin tokens, the change log
//! and webhook idempotency records. One code path for SQLite (the embedded default) and
//! PostgreSQL, chosen by the URL; the schema is created at start.
//!
//! Every write runs in one transaction that also appends to `changes`, whose primary key is the
//! revision: two writers that raced for the same revision cannot both commit.

use crate::error::ApiError;
use quota::policy::{PolicyDoc, Snapshot, SubjectEntry};
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
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
];

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
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn revision(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) AS r FROM changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(u(row.try_get::<i64, _>("r")?))
    }

    /// Start a write at the next revision. The caller holds the control plane's write lock, so
    /// the revision read here is still the latest when the transaction commits.
    pub async fn begin(&self) -> Result<Write<'static>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) AS r FROM changes")
            .fetch_one(&mut *tx)
            .await?;
        let revision = u(row.try_get::<i64, _>("r")?) + 1;
        Ok(Write {
            tx,
            revision,
            now_ms: now_ms(),
        })
    }

    /// The state a gateway enforces, optionally with a change not yet written (for validation).
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let revision = self.revision().await?;
        let policy = self.active_policy().await?.map(|p| PolicyDoc {
            version: p.version,
            yaml: p.yaml.unwrap_or_default(),
        });
        let mut subjects = Vec::new();
        let mut hashes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in sqlx::query(
            "SELECT subject_id, sha256 FROM api_keys WHERE revoked_at_ms IS NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?
        {
            hashes
                .entry(row.try_get("subject_id")?)
                .or_default()
                .push(row.try_get("sha256")?);
        }
        for row in sqlx::query("SELECT * FROM subjects ORDER BY id")
            .fetch_all(&self.pool)
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

    pub async fn policy_history(&self) -> Result<Vec<PolicyVersion>, StoreError> {
        sqlx::query("SELECT * FROM policy_versions ORDER BY version DESC")
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
    /// that call's body.
    pub async fn entitlement_request(
        &self,
        key: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT request_sha256, response FROM entitlement_requests WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
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

    /// The role of an unrevoked token, by its id; with the stored hash to compare.
    pub async fn token(&self, id: &str) -> Result<Option<(String, String, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT name, role, sha256 FROM admin_tokens WHERE id = $1 AND revoked_at_ms IS NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("name")?, r.try_get("role")?, r.try_get("sha256")?)))
            .transpose()
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

    /// Insert a token; with `replace`, one with the same id is replaced (the bootstrap token is
    /// re-written at every start). Without it an id clash is an error, never a silent takeover.
    pub async fn put_token(
        &self,
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
             ON CONFLICT (id) DO UPDATE SET name = $2, role = $3, sha256 = $4, revoked_at_ms = NULL"
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
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE admin_tokens SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
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
