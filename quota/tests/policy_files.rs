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
