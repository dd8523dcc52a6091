//! Start-up checks of the Kafka security options (TLS, SASL) a producer or consumer is given, so a
//! misconfiguration stops the process at once with the option, the path and the reason — rather
//! than surfacing later as an endless "all brokers down" while audit events pile up in the spool.
//!
//! Two things are checked, both before any client is created:
//! - the protocol and SASL mechanism asked for are compiled into this librdkafka (its
//!   `builtin.features`): this build has `ssl` and `sasl` with PLAIN, SCRAM and OAUTHBEARER, not
//!   Kerberos (GSSAPI, which needs Cyrus SASL);
//! - every option naming a file (CA, certificate, key, keystore, CRL, keytab) names one that exists
//!   and can be read (the CA location may also be a directory, or `probe`).

use rdkafka::config::ClientConfig;
use std::path::Path;

/// Options whose value is a path read at client creation.
const FILE_OPTIONS: &[&str] = &[
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.keystore.location",
    "ssl.crl.location",
    "sasl.kerberos.keytab",
];

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("Kafka option {option}={path}: {reason}")]
    File {
        option: String,
        path: String,
        reason: String,
    },
    #[error(
        "Kafka option {option}={value}: this build's Kafka client lacks the `{feature}` feature \
         (it has: {available})"
    )]
    Unsupported {
        option: String,
        value: String,
        feature: &'static str,
        available: String,
    },
    #[error("Kafka option {option}={value}: expected one of {expected}")]
    Invalid {
        option: String,
        value: String,
        expected: &'static str,
    },
    #[error("cannot read the Kafka client's built-in features: {0}")]
    Features(#[from] rdkafka::error::KafkaError),
}

/// The features librdkafka was compiled with (`builtin.features`), e.g. `ssl`, `sasl_scram`.
pub fn builtin_features() -> Result<Vec<String>, SecurityError> {
    let native = ClientConfig::new().create_native_config()?;
    let list = native.get("builtin.features")?;
    Ok(list.split(',').map(|f| f.trim().to_string()).collect())
}

/// Check the librdkafka properties `options` (as given with `--audit-kafka-option` or
/// `--kafka-option`): see the module documentation.
pub fn check(options: &[(String, String)]) -> Result<(), SecurityError> {
    let get = |key: &str| {
        options
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let mut needed: Vec<(&str, &str, &'static str)> = Vec::new();
    if let Some(p) = get("security.protocol") {
        match p.to_ascii_lowercase().as_str() {
            "plaintext" => {}
            "ssl" => needed.push(("security.protocol", p, "ssl")),
            "sasl_plaintext" => needed.push(("security.protocol", p, "sasl")),
            "sasl_ssl" => {
                needed.push(("security.protocol", p, "ssl"));
                needed.push(("security.protocol", p, "sasl"));
            }
            _ => {
                return Err(SecurityError::Invalid {
                    option: "security.protocol".into(),
                    value: p.into(),
                    expected: "plaintext, ssl, sasl_plaintext, sasl_ssl",
                });
            }
        }
    }
    for key in ["sasl.mechanism", "sasl.mechanisms"] {
        if let Some(m) = get(key) {
            let feature = match m.to_ascii_uppercase().as_str() {
                "PLAIN" => "sasl_plain",
                "SCRAM-SHA-256" | "SCRAM-SHA-512" => "sasl_scram",
                "OAUTHBEARER" => "sasl_oauthbearer",
                "GSSAPI" => "sasl_gssapi",
                _ => {
                    return Err(SecurityError::Invalid {
                        option: key.into(),
                        value: m.into(),
                        expected: "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI",
                    });
                }
            };
            needed.push((key, m, feature));
        }
    }
    if !needed.is_empty() {
        let features = builtin_features()?;
        for (option, value, feature) in needed {
            // librdkafka lists `sasl_gssapi` even when built without Cyrus SASL, which Kerberos
            // needs and this build leaves out (no `gssapi` feature of rdkafka): it would fail only
            // when the client is created, with a less helpful message.
            let present = feature != "sasl_gssapi" && features.iter().any(|f| f == feature);
            if !present {
                return Err(SecurityError::Unsupported {
                    option: option.into(),
                    value: value.into(),
                    feature,
                    available: features
                        .iter()
                        .filter(|f| *f != "sasl_gssapi")
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(","),
                });
            }
        }
    }
    for &option in FILE_OPTIONS {
        if let Some(path) = get(option) {
            check_file(option, path)?;
        }
    }
    Ok(())
}

fn check_file(option: &str, path: &str) -> Result<(), SecurityError> {
    let fail = |reason: String| SecurityError::File {
        option: option.into(),
        path: path.into(),
        reason,
    };
    // librdkafka's own search of the system's CA stores.
    if option == "ssl.ca.location" && path == "probe" {
        return Ok(());
    }
    let meta = std::fs::metadata(Path::new(path)).map_err(|e| fail(io_reason(&e)))?;
    if meta.is_dir() {
        if option == "ssl.ca.location" {
            return std::fs::read_dir(path)
                .map(|_| ())
                .map_err(|e| fail(io_reason(&e)));
        }
        return Err(fail("is a directory, not a file".into()));
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| fail(io_reason(&e)))?;
    if meta.len() == 0 {
        return Err(fail("the file is empty".into()));
    }
    Ok(())
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (not readable by this user)".into()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// What the README promises: TLS and SASL with PLAIN, SCRAM and OAUTHBEARER are compiled in.
    #[test]
    fn the_client_is_built_with_tls_and_sasl() {
        let f = builtin_features().expect("features");
        for want in [
            "ssl",
            "sasl",
            "sasl_plain",
            "sasl_scram",
            "sasl_oauthbearer",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
        let ok = opts(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
        ]);
        check(&ok).expect("supported");
    }

    #[test]
    fn a_missing_tls_file_names_the_option_the_path_and_the_reason() {
        let e = check(&opts(&[
            ("security.protocol", "ssl"),
            ("ssl.ca.location", "/nonexistent/ca.pem"),
        ]))
        .expect_err("missing CA");
        assert_eq!(
            e.to_string(),
            "Kafka option ssl.ca.location=/nonexistent/ca.pem: no such file"
        );
        let dir = std::env::temp_dir();
        let e = check(&opts(&[(
            "ssl.certificate.location",
            dir.to_str().expect("utf-8"),
        )]))
        .expect_err("a directory");
        assert!(e.to_string().ends_with("is a directory, not a file"), "{e}");
        // A CA directory and librdkafka's probe are fine.
        check(&opts(&[("ssl.ca.location", dir.to_str().expect("utf-8"))])).expect("CA dir");
        check(&opts(&[("ssl.ca.location", "probe")])).expect("probe");
    }

    #[test]
    fn unknown_protocols_and_mechanisms_are_refused() {
        let e = check(&opts(&[("security.protocol", "tls")])).expect_err("unknown");
        assert!(
            e.to_string().contains("expected one of plaintext, ssl"),
            "{e}"
        );
        let e = check(&opts(&[("sasl.mechanism", "GSSAPI")])).expect_err("no Kerberos");
        assert!(
            e.to_string().contains("lacks the `sasl_gssapi` feature"),
            "{e}"
        );
    }
}
