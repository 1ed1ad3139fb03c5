// SPDX-License-Identifier: Apache-2.0
//! Fuzz properties of `keyward-proto`: what must hold for any input.
//!
//! One source for both runners: the cargo-fuzz targets in
//! `fuzz/fuzz_targets/` and the bounded runs of `proto/tests/fuzz.rs`
//! include this file with `#[path]`. Each check panics when a property
//! fails, which both runners report as a finding.

use ed25519_dalek::SigningKey;
use keyward_proto::token::{self, TokenBody, TokenId};
use keyward_proto::{decode, encode, Request, Response};

/// The fixed key of the token target; the committed corpus holds tokens
/// it signed, so mutations start from valid tokens.
pub const TOKEN_KEY: [u8; 32] = [7; 32];

/// `decode` of untrusted bytes never panics, and whatever it accepts
/// encodes again to a message that decodes to the same value, in no more
/// bytes than were read.
pub fn decode_message(data: &[u8]) {
    if let Ok(req) = decode::<Request>(data) {
        let again = encode(&req).expect("an accepted request encodes");
        assert!(again.len() <= data.len(), "re-encoding grew the request");
        assert_eq!(decode::<Request>(&again).expect("re-decodes"), req);
    }
    if let Ok(resp) = decode::<Response>(data) {
        let again = encode(&resp).expect("an accepted response encodes");
        assert!(again.len() <= data.len(), "re-encoding grew the response");
        assert_eq!(decode::<Response>(&again).expect("re-decodes"), resp);
    }
}

/// Token parsing and verification never panic; a string that verifies is
/// exactly the string the key would issue for its body (no second
/// encoding of a body carries a valid signature); and any body the codec
/// accepts, once issued, verifies to the same body under this key only.
pub fn token(data: &[u8]) {
    let key = SigningKey::from_bytes(&TOKEN_KEY);
    let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<TokenId>();
        let _ = token::inspect(text);
        let _ = token::token_hash(text);
        assert!(
            token::verify(text, &other).is_err(),
            "verified under another key"
        );
        if let Ok(verified) = token::verify(text, &key.verifying_key()) {
            assert_eq!(
                token::issue(&verified.body, &key),
                text,
                "a second encoding of a token verified"
            );
            assert_eq!(token::inspect(text).ok(), Some(verified.body.clone()));
            assert_eq!(token::token_hash(text).ok(), Some(verified.hash));
        }
    }
    if let Ok(body) = decode::<TokenBody>(data) {
        let issued = token::issue(&body, &key);
        if issued.len() <= token::MAX_TOKEN_LEN {
            let verified =
                token::verify(&issued, &key.verifying_key()).expect("own token verifies");
            assert_eq!(verified.body, body);
            assert!(token::verify(&issued, &other).is_err());
        }
    }
}
