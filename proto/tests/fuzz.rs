// SPDX-License-Identifier: Apache-2.0
//! The fuzz targets of `proto` (`decode_message`, `token`), run for a
//! bounded number of cases on stable: every committed corpus entry, then
//! random edits of them and random bytes. The properties are those of the
//! cargo-fuzz targets (`fuzz/checks/proto.rs`); a case that fails here is
//! a finding to add to the corpus once fixed.

#[path = "../../fuzz/checks/proto.rs"]
mod checks;
#[path = "../../fuzz/checks/mutate.rs"]
mod mutate;

use proptest::prelude::*;

#[test]
fn decode_message_corpus() {
    for seed in mutate::corpus("decode_message") {
        checks::decode_message(&seed);
    }
}

#[test]
fn token_corpus() {
    let seeds = mutate::corpus("token");
    // The corpus holds at least one valid token, so edits start from one.
    let key = ed25519_dalek::SigningKey::from_bytes(&checks::TOKEN_KEY);
    assert!(seeds.iter().any(|s| std::str::from_utf8(s)
        .is_ok_and(|t| keyward_proto::token::verify(t, &key.verifying_key()).is_ok())));
    for seed in seeds {
        checks::token(&seed);
    }
}

/// The end of a token string is where a lax base64 decoder would accept
/// a second spelling (unused low bits of the last character, padding):
/// try every spelling of the last character of each valid corpus token,
/// and padded ones.
#[test]
fn token_tail_variants() {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=";
    let key = ed25519_dalek::SigningKey::from_bytes(&checks::TOKEN_KEY).verifying_key();
    let valid = mutate::corpus("token").into_iter().filter(|s| {
        std::str::from_utf8(s).is_ok_and(|t| keyward_proto::token::verify(t, &key).is_ok())
    });
    for seed in valid {
        let last = seed.len() - 1;
        for &c in ALPHABET {
            let mut variant = seed.clone();
            variant[last] = c;
            checks::token(&variant);
        }
        for pad in ["=", "==", "\n"] {
            checks::token(&[seed.as_slice(), pad.as_bytes()].concat());
        }
    }
}

proptest! {
    #![proptest_config(mutate::config(2000))]

    #[test]
    fn decode_message_edits(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec(mutate::edit(), 1..8),
    ) {
        checks::decode_message(&mutate::edited("decode_message", &pick, &edits));
    }

    #[test]
    fn decode_message_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        checks::decode_message(&data);
    }
}

proptest! {
    // Each case verifies an ed25519 signature: fewer cases.
    #![proptest_config(mutate::config(300))]

    #[test]
    fn token_edits(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec(mutate::edit(), 1..4),
    ) {
        checks::token(&mutate::edited("token", &pick, &edits));
    }
}
