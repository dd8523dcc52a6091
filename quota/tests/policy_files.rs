//! The shipped policy files: the example loads, and every fixture in `policies/invalid/` is rejected
//! with exactly the message a policy author should see (file:line:column: field path: reason).

use quota::policy::load_path;
use std::path::{Path, PathBuf};

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn example_policy_loads_and_routes() {
    let p = load_path(&policies().join("example.yaml")).expect("example policy is valid");
    assert_eq!(p.version, "example-1");
    assert_eq!(p.hash.len(), 64);
    let route = p
        .route("GET", Some("localhost:8080"), "/lookup/42")
        .expect("lookup route");
    assert_eq!(&*route.quota, "lookup");
    assert_eq!(route.upstream.address, "127.0.0.1:8000");
    assert!(p.route("GET", None, "/nothing").is_none());
    assert!(
        p.route("GET", None, "/v1/chat/completions").is_none(),
        "chat is POST only"
    );
}

const EXPECTED: &[(&str, &str)] = &[
    (
        "bad_address",
        "3:20: upstreams.demo.address: expected `host:port` with a port from 1 to 65535, got `127.0.0.1`",
    ),
    (
        "bad_failure_mode",
        "2:15: failure_mode: unknown variant `fail_sometimes`, expected one of fail_open, fail_closed, local",
    ),
    (
        "bad_name",
        "10:36: subjects[0].id: invalid subject id: character `}` at byte 4 is not allowed; use letters, digits, `_ - . : @ +`",
    ),
    (
        "bad_path_prefix",
        "6:27: routes[0].match.path_prefix: expected a path starting with `/`, got `lookup`",
    ),
    (
        "bad_period",
        "11:41: tiers.free.lookup.rates[0].per: unknown variant `fortnight`, expected one of second, minute, hour",
    ),
    (
        "bad_time_zone",
        "13:50: subjects[0].time_zone: unknown time zone `Europe/Atlantis`; expected an IANA name such as `Europe/Berlin` or `UTC`",
    ),
    (
        "duplicate_key",
        "14:12: subjects[1].key: this API key is already given to another subject",
    ),
    (
        "empty_quota",
        "11:13: tiers.free.lookup: expected at least one of `rates`, `daily`, `monthly`, `concurrent`, or `unlimited: true`",
    ),
    ("missing_field", "7:5: routes[0]: missing field `quota`"),
    (
        "reserved_subject_id",
        "13:33: subjects[0].id: the subject id `guest` is reserved for keys admitted under `guest_tier`",
    ),
    ("syntax_error", "10:3: tiers: expected mapping start"),
    (
        "unknown_field",
        "11:15: tiers.free.lookup.daly: unknown field `daly`, expected one of rates, daily, monthly, concurrent, unlimited",
    ),
    (
        "unknown_quota",
        "8:12: routes[0].quota: quota type `lookups` is not defined by any tier; defined quota types: lookup",
    ),
    (
        "unknown_tier",
        "13:33: subjects[0].tier: unknown tier `gold`; defined tiers: free",
    ),
    (
        "unknown_upstream",
        "7:15: routes[0].upstream: unknown upstream `dmeo`; defined upstreams: demo",
    ),
    (
        "unnormalized_prefix",
        "5:43: routes[0].match.path_prefix: `/api//lookup/./v1` is not in normal form (requests are matched after normalization); write `/api/lookup/v1`",
    ),
    ("wrong_type", "11:22: tiers.free.lookup.daily: invalid u64"),
    (
        "zero_limit",
        "11:22: tiers.free.lookup.daily: expected a limit of at least 1 (remove the quota type from the tier to deny it)",
    ),
];

#[test]
fn every_invalid_fixture_gets_its_exact_message() {
    let dir = policies().join("invalid");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .collect();
    on_disk.sort();
    let listed: Vec<&str> = EXPECTED.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        on_disk, listed,
        "every fixture has an expected message, and only those"
    );
    let mut mismatches = 0;
    for (name, expected) in EXPECTED {
        let path = dir.join(format!("{name}.yaml"));
        let err = load_path(&path).expect_err(name).to_string();
        let got = err
            .strip_prefix(&format!("{}:", path.display()))
            .unwrap_or(&err);
        if got != *expected {
            eprintln!("MISMATCH (\"{name}\", \"{got}\"),");
        }
        mismatches += usize::from(got != *expected);
    }
    assert_eq!(
        mismatches, 0,
        "fixtures whose message differs (printed above)"
    );
}

#[test]
fn a_directory_merges_its_files_and_cross_references_work_across_them() {
    let dir = std::env::temp_dir().join(format!("tollgate-policy-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a-subjects.yaml"),
        "subjects:\n  - { key: k, id: s, tier: t }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b-tiers.yaml"),
        "tiers:\n  t:\n    q: { daily: 3 }\nupstreams:\n  u: { address: 'localhost:1' }\nroutes:\n  - { name: r, match: { path_prefix: / }, upstream: u, quota: q }\n",
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), "not a policy").unwrap();
    let p = load_path(&dir).expect("merged policy");
    assert_eq!(p.subjects().count(), 1);
    std::fs::write(
        dir.join("c-dup.yaml"),
        "tiers:\n  t:\n    q: { daily: 4 }\n",
    )
    .unwrap();
    let err = load_path(&dir).expect_err("duplicate tier").to_string();
    assert!(
        err.ends_with("c-dup.yaml:3:5: tiers.t: tier `t` is defined twice"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

const BASE: &str = "upstreams:
  up: { address: '127.0.0.1:9' }
routes:
  - { name: lookup, match: { path_prefix: /lookup }, upstream: up, quota: lookup }
tiers:
  free: { lookup: { daily: 10 } }
  pro: { lookup: { daily: 1000 } }
guest_tier: free
subjects:
  - { key: local-key, id: ops, tier: pro }
  - { key: shared-key, id: alice, tier: free }
";

fn sources(texts: &[&str]) -> Vec<(String, String)> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("s{i}.yaml"), t.to_string()))
        .collect()
}

#[test]
fn hashed_keys_overrides_and_disabled_subjects() {
    use quota::policy::{EntitlementSource, key_sha256_hex, parse_sources};
    let hashed = format!(
        "subjects:
  - id: acme
    tier: free
    key_sha256: ['{}', '{}']
    overrides: {{ lookup: {{ daily: 50 }} }}
  - {{ id: gone, tier: pro, enabled: false, key_sha256: ['{}'] }}
",
        key_sha256_hex("acme-1"),
        key_sha256_hex("acme-2").to_uppercase(),
        key_sha256_hex("gone-1"),
    );
    let p = parse_sources(&sources(&[BASE, &hashed])).expect("valid");
    let a1 = p.subject_for_key("acme-1").expect("hashed key");
    let a2 = p.subject_for_key("acme-2").expect("upper-case hex too");
    assert!(std::sync::Arc::ptr_eq(&a1, &a2), "one subject, two keys");
    assert_eq!(&*a1.tier.name, "free");
    let free = &p.tiers["free"];
    assert_ne!(
        a1.tier.quotas.get("lookup"),
        free.quotas.get("lookup"),
        "override applied"
    );
    assert!(p.subject_for_key("acme-3").is_none());
    assert!(!p.subject_for_key("gone-1").expect("known").enabled);
    assert_eq!(p.guest_tier.as_ref().map(|t| &*t.name), Some("free"));
}

#[test]
fn subject_errors_name_the_field() {
    use quota::policy::parse_sources;
    let bad = "subjects:
  - { id: a, tier: free, key_sha256: [abc] }
  - { id: b, tier: free }
  - { id: c, tier: free, key: k, overrides: { nope: { daily: 1 } } }
";
    let err = parse_sources(&sources(&[BASE, bad]))
        .expect_err("invalid")
        .to_string();
    for want in [
        "s1.yaml:2:39: subjects[0].key_sha256[0]: expected a SHA-256 as 64 hexadecimal digits",
        "s1.yaml:3:20: subjects[1]: a subject needs `key` or `key_sha256` (its API keys)",
        "s1.yaml:4:53: subjects[2].overrides.nope: quota type `nope` is not defined by any tier",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    let guest = BASE.replace("guest_tier: free", "guest_tier: gold");
    let err = parse_sources(&sources(&[&guest]))
        .expect_err("invalid")
        .to_string();
    assert!(
        err.contains("s0.yaml:8:13: guest_tier: unknown tier `gold`"),
        "{err}"
    );
}

#[test]
fn overlay_subjects_replace_base_subjects_with_the_same_id_or_key() {
    use quota::policy::{EntitlementSource, parse_layered};
    let overlay = "subjects:
  - { id: alice, tier: pro, key: alice-new }
  - { id: bob, tier: pro, key: shared-key }
";
    let p = parse_layered(
        &sources(&[BASE, overlay]),
        1,
        quota::policy::EnvMode::Strict,
    )
    .expect("valid");
    assert!(
        p.subject_for_key("local-key").is_some(),
        "base subjects stay"
    );
    assert_eq!(
        &*p.subject_for_key("alice-new").expect("alice").tier.name,
        "pro"
    );
    assert_eq!(&*p.subject_for_key("shared-key").expect("bob").id, "bob");
    assert_eq!(p.subjects().count(), 3, "alice once, from the overlay");
    // Without the layering the same texts conflict.
    assert!(quota::policy::parse_sources(&sources(&[BASE, overlay])).is_err());
}

#[test]
fn a_price_book_is_included_by_path_and_its_errors_point_into_it() {
    let dir = std::env::temp_dir().join(format!("tollgate-price-book-{}", std::process::id()));
    let books = dir.join("books");
    std::fs::create_dir_all(&books).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "models_file: ./books/prices.yaml\n\
         upstreams:\n  u: { address: '127.0.0.1:9' }\n\
         routes:\n  - { name: chat, match: { path_prefix: /v1 }, upstream: u, quota: requests,\n      llm: { provider: openai, tokens: tokens, spend: spend } }\n\
         tiers:\n  t:\n    requests: { daily: 10 }\n    tokens: { daily: 10 }\n    spend: { daily: 10 }\n",
    )
    .unwrap();
    let book = books.join("prices.yaml");
    std::fs::write(
        &book,
        "models:\n  gpt-4o: { input_per_million: 2.5, cached_input_per_million: 1.25, output_per_million: 10 }\n",
    )
    .unwrap();
    let p = load_path(&policy).expect("policy with its price book");
    let price = p
        .price("gpt-4o-2024-08-06")
        .expect("a dated name is priced by its base entry");
    assert_eq!(
        (
            price.input_micros_per_m,
            price.cached_input_micros_per_m,
            price.cache_write_micros_per_m
        ),
        (2_500_000, 1_250_000, 2_500_000),
        "cache writes default to the input price"
    );

    std::fs::write(
        &book,
        "models:\n  gpt-4o: { input_per_million: 2.5, output_per_million: 10 }\n  o3: { input_per_million: 2, output_per_million: 8, cached_input_per_million: -1 }\n",
    )
    .unwrap();
    let err = load_path(&policy)
        .expect_err("a negative price")
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}:3:7: models.o3.cached_input_per_million: expected a price of 0 or more per million tokens, got -1",
            book.display()
        )
    );

    std::fs::write(&book, "models: {}\ntiers:\n  x:\n    a: { daily: 1 }\n").unwrap();
    let err = load_path(&policy)
        .expect_err("limits in a price book")
        .to_string();
    assert!(
        err.contains(
            "books/prices.yaml:1:1: tiers: a price book (`models_file`) holds only `models`"
        ),
        "{err}"
    );

    std::fs::remove_file(&book).unwrap();
    let err = load_path(&policy)
        .expect_err("a missing price book")
        .to_string();
    assert!(
        err.starts_with(&format!(
            "{}:1:14: models_file: cannot read the price book",
            policy.display()
        )),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A model takes the price of an entry it is a version of, never of an entry that merely starts
/// its name: `o1-pro` costs many times `o1`, `gpt-4o-mini` a fraction of `gpt-4o`.
#[test]
fn only_versions_of_a_model_share_its_price() {
    let yaml = "upstreams:\n  u: { address: '127.0.0.1:9' }\n\
         routes:\n  - { name: chat, match: { path_prefix: /v1 }, upstream: u, quota: requests,\n      llm: { provider: openai, tokens: tokens, spend: spend } }\n\
         tiers:\n  t:\n    requests: { daily: 10 }\n    tokens: { daily: 10 }\n    spend: { daily: 10 }\n\
         models:\n  o1: { input_per_million: 15, output_per_million: 60 }\n  \
         claude-3-5-sonnet: { input_per_million: 3, output_per_million: 15 }\n  \
         gpt-4: { input_per_million: 30, output_per_million: 60 }\n";
    let p =
        quota::policy::parse_sources(&[("p.yaml".to_string(), yaml.to_string())]).expect("policy");
    let input = |m: &str| p.price(m).map(|x| x.input_micros_per_m);
    for versioned in [
        "o1-2024-12-17",
        "o1@20241217",
        "o1-latest",
        "claude-3-5-sonnet-20241022",
        "claude-3-5-sonnet-v2@20241022",
        "gpt-4-0613",
    ] {
        assert!(input(versioned).is_some(), "{versioned}");
    }
    assert_eq!(input("o1-2024-12-17"), Some(15_000_000));
    for other in [
        "o1-pro",
        "o1-mini",
        "gpt-4o",
        "gpt-4-turbo",
        "claude-3-5-sonnet-v2x",
    ] {
        assert_eq!(input(other), None, "{other} is another model");
    }
}

/// A `${NAME}` the process lacks refuses a policy file, while a control-plane snapshot applies
/// with that upstream marked unresolved (its requests refused, the rest enforced).
#[test]
fn a_missing_header_variable_refuses_a_file_and_marks_a_snapshot_upstream() {
    let yaml = "upstreams:\n  up: { address: '127.0.0.1:9' }\n  \
         vendor: { address: '127.0.0.1:9', headers: { authorization: 'Bearer ${TG_TEST_UNSET_VAR}' } }\n\
         routes:\n  - { name: a, match: { path_prefix: /a }, upstream: up, quota: q }\n  \
         - { name: b, match: { path_prefix: /b }, upstream: vendor, quota: q }\n\
         tiers:\n  t:\n    q: { daily: 10 }\n";
    let sources = [("p.yaml".to_string(), yaml.to_string())];
    let err = quota::policy::parse_sources(&sources).expect_err("strict");
    assert!(
        err.to_string()
            .contains("environment variable `TG_TEST_UNSET_VAR` is not set"),
        "{err}"
    );
    let p = quota::policy::parse_layered(&sources, 1, quota::policy::EnvMode::Lenient)
        .expect("lenient");
    let upstream = |route: &str| {
        p.routes
            .iter()
            .find(|r| &*r.name == route)
            .expect("route")
            .upstream
            .clone()
    };
    assert_eq!(
        upstream("b").unresolved.as_deref(),
        Some("TG_TEST_UNSET_VAR")
    );
    assert!(upstream("b").headers.is_empty());
    assert_eq!(upstream("a").unresolved, None);
    // The gateway's own variables (its tokens) are never sent upstream, in either mode.
    let own = yaml.replace("TG_TEST_UNSET_VAR", "TOLLGATE_API_TOKEN");
    let sources = [("p.yaml".to_string(), own)];
    for env in [
        quota::policy::EnvMode::Strict,
        quota::policy::EnvMode::Lenient,
    ] {
        let err = quota::policy::parse_layered(&sources, 1, env).expect_err("reserved");
        assert!(err.to_string().contains("TOLLGATE_API_TOKEN"), "{err}");
    }
}
