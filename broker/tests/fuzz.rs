// SPDX-License-Identifier: Apache-2.0
//! The fuzz targets of the broker's admin-facing parsers
//! (`config_policy`, `templates`), run for a bounded number of cases on
//! stable: every committed corpus entry, then random edits of them. The
//! properties are those of the cargo-fuzz targets
//! (`fuzz/checks/broker.rs`).

#[path = "../../fuzz/checks/broker.rs"]
mod checks;
#[path = "../../fuzz/checks/leak.rs"]
mod leak;
#[path = "../../fuzz/checks/mutate.rs"]
mod mutate;

use proptest::prelude::*;

#[test]
fn config_policy_corpus() {
    let seeds = mutate::corpus("config_policy");
    // The corpus holds a configuration that compiles, so edits start from
    // one and reach the compiler, not only the TOML parser.
    assert!(seeds.iter().any(|s| {
        let text = String::from_utf8(s.clone()).expect("UTF-8 seed");
        keyward_broker::config::Source::parse("seed.toml", text)
            .is_ok_and(|src| keyward_broker::policy::Policy::compile(&src).is_ok())
    }));
    for seed in seeds {
        checks::config_policy(&seed);
    }
}

#[test]
fn templates_corpus() {
    for seed in mutate::corpus("templates") {
        checks::templates(&seed);
    }
}

/// The path property holds against the values an attacker would pick.
#[test]
fn templates_hostile_values() {
    let values = [
        "../admin",
        "..",
        ".",
        "%2e%2e",
        "a/b",
        "a\\b",
        "%2F",
        "?x=1",
        "#top",
        "",
        "@evil.com",
        "\u{0}",
        "é/..",
        "}",
        "{x}",
    ];
    for url in [
        "https://api.example.com/v1/{a}",
        "https://api.example.com/v1/{a}/{b}?q={c}",
        "https://api.example.com/v1/x{a}y/z",
        "http://127.0.0.1:8080/{a}.{b}",
    ] {
        for a in values {
            for b in values {
                checks::templates(format!("{url}\0\0{a}\0{b}\0{a}{b}").as_bytes());
            }
        }
    }
}

/// Findings of the `templates` target (`cargo fuzz run templates`, 60 s):
/// an empty value next to a literal `.` makes a dot segment, which the
/// URL parser resolves: `{a}.{b}` with both empty is `.` (the segment
/// vanishes), and `..{a}` with `a` empty is `..` (one level up).
/// Found by the `templates` fuzz target: `check_segment` once asked
/// whether a value's span overlapped the segment, and an empty span at
/// either end of it overlapped nothing. Every rendered segment that holds
/// a value is now judged whole.
#[test]
fn templates_empty_value_next_to_literal_dots() {
    checks::templates(b"https://h.example/{a}.{b}/{{nit}}\0\0\0");
    checks::templates(b"https://api.example.com/v1/b/..{a}\0\0");
}

#[test]
fn leak_scan_corpus() {
    for seed in mutate::corpus("leak_scan") {
        leak::leak_scan(&seed);
    }
}

/// Every encoding, every window, at the start, the middle and the end.
#[test]
fn leak_scan_every_encoding_and_window() {
    for how in 0..8u8 {
        for which in 0..25u8 {
            for at in [0u8, 7, 255] {
                let mut input = vec![how, which, at];
                input.extend_from_slice(b"{\"note\":\"nothing to see\"}");
                leak::leak_scan(&input);
            }
        }
    }
}

proptest! {
    // Each case compiles a whole policy (regexes included): few cases.
    #![proptest_config(mutate::config(300))]

    #[test]
    fn config_policy_edits(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec(mutate::edit(), 1..6),
    ) {
        checks::config_policy(&mutate::edited("config_policy", &pick, &edits));
    }

    #[test]
    fn templates_edits(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec(mutate::edit(), 1..6),
    ) {
        checks::templates(&mutate::edited("templates", &pick, &edits));
    }

    #[test]
    fn leak_scan_edits(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec(mutate::edit(), 1..8),
    ) {
        leak::leak_scan(&mutate::edited("leak_scan", &pick, &edits));
    }

    #[test]
    fn leak_scan_random_bodies(data in prop::collection::vec(any::<u8>(), 3..600)) {
        leak::leak_scan(&data);
    }
}
