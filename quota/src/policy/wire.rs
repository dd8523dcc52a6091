//! The control plane's wire format: its state as a gateway receives it, one policy document and
//! the subjects' entitlements at a revision. The control plane validates every change by compiling the
//! snapshot it would publish with the same function a gateway applies it with, so a snapshot that
//! reaches a gateway always compiles.

use super::{EnvMode, Policy, PolicyErrors, parse_layered};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Increases with every change to policies or subjects; a gateway never goes back.
    pub revision: u64,
    /// The active policy version; `None` until an admin uploads one.
    pub policy: Option<PolicyDoc>,
    pub subjects: Vec<SubjectEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDoc {
    pub version: u64,
    pub yaml: String,
}

/// One subject with the hashes of its API keys, written as a policy's `subjects:` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubjectEntry {
    pub id: String,
    pub tier: String,
    pub time_zone: String,
    pub enabled: bool,
    /// Per quota type, limits in the policy's tier syntax (`{"daily": 500}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, serde_json::Value>,
    pub key_sha256: Vec<String>,
}

impl Snapshot {
    /// The named sources this snapshot compiles from: its policy document (or `base`, a policy
    /// file's sources, when it has none) and its subjects, which take the place of base subjects
    /// with the same id or key. Returns the sources and where the subjects' overlay starts.
    pub fn sources(&self, base: &[(String, String)]) -> (Vec<(String, String)>, usize) {
        let mut sources = match &self.policy {
            Some(p) => vec![(
                format!("control-plane policy v{}", p.version),
                p.yaml.clone(),
            )],
            None => base.to_vec(),
        };
        let overlay_from = sources.len();
        // Subjects without keys cannot be used by anyone; a policy entry needs at least one.
        let subjects: Vec<&SubjectEntry> = self
            .subjects
            .iter()
            .filter(|s| !s.key_sha256.is_empty())
            .collect();
        if !subjects.is_empty() {
            // JSON is YAML: the policy reader parses this with the same checks as a file.
            let text = serde_json::to_string_pretty(&serde_json::json!({ "subjects": subjects }))
                .unwrap_or_default();
            sources.push((format!("control-plane subjects r{}", self.revision), text));
        }
        (sources, overlay_from)
    }

    /// Compile over the policy file texts `base`. A `${NAME}` this process lacks does not refuse
    /// the snapshot (see [`EnvMode::Lenient`]): only that upstream's requests are refused.
    pub fn compile(&self, base: &[(String, String)]) -> Result<Policy, PolicyErrors> {
        let (sources, overlay_from) = self.sources(base);
        if sources.is_empty() {
            return Ok(Policy::empty());
        }
        parse_layered(&sources, overlay_from, EnvMode::Lenient)
    }
}
