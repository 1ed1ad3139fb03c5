// SPDX-License-Identifier: Apache-2.0
//! Capability tokens: `kw1.` + base64url(postcard(signed token)).
//!
//! The signature covers the *exact* bytes of the encoded body (prefixed
//! with a context string), and verification decodes the body from those
//! same bytes: nothing is re-encoded, so no alternative encoding of the
//! same body can carry a valid signature, and any single-bit change to a
//! token string is rejected.
//!
//! A token string is a bearer credential for its audience: it must never
//! be logged. Types here that hold one print `[token]` in `Debug`.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::codec::{decode, DecodeError};
use crate::value::Value;

/// Every token string starts with this.
pub const TOKEN_PREFIX: &str = "kw1.";
/// Longest token string accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Domain separation for the signature.
const SIGNING_CONTEXT: &[u8] = b"keyward token v1\0";
/// Domain separation for call hashes.
const CALL_HASH_CONTEXT: &str = "keyward call v1";
/// Domain separation for task hashes.
const TASK_HASH_CONTEXT: &str = "keyward task v1";
/// Domain separation for token hashes (`parent`).
const TOKEN_HASH_CONTEXT: &str = "keyward token hash v1";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A token's 128-bit random id: the handle for revocation and audit.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TokenId(pub [u8; 16]);

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

impl FromStr for TokenId {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<TokenId, TokenError> {
        let bytes = s.as_bytes();
        if bytes.len() != 32 {
            return Err(TokenError::BadId);
        }
        let mut id = [0u8; 16];
        for (out, pair) in id.iter_mut().zip(bytes.chunks_exact(2)) {
            let hi = hex_digit(pair[0]).ok_or(TokenError::BadId)?;
            let lo = hex_digit(pair[1]).ok_or(TokenError::BadId)?;
            *out = hi << 4 | lo;
        }
        Ok(TokenId(id))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lower-case hex of a hash, for audit records and display.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Who may present the token: the kernel-reported uid (and gid, if set)
/// of the presenting process.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Audience {
    pub uid: u32,
    pub gid: Option<u32>,
}

/// One constraint on one parameter. A grant may list several constraints
/// for the same parameter: all of them must hold.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Constraint {
    /// Exactly this value.
    Exact(Value),
    /// One of these values.
    OneOf(#[serde(deserialize_with = "crate::bounded::vec")] Vec<Value>),
    /// A string starting with this.
    Prefix(String),
    /// A string wholly matching this regex.
    Pattern(String),
    /// An int within `min..=max`.
    Range { min: i64, max: i64 },
    /// Anything the tool's own policy accepts.
    Any,
}

/// A constraint on a named parameter.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ParamConstraint {
    pub name: String,
    pub constraint: Constraint,
}

/// Permission to call one tool, with constraints on its parameters.
/// Parameters not named are constrained only by the tool's policy.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Grant {
    pub tool: String,
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub params: Vec<ParamConstraint>,
}

/// The signed content of a token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct TokenBody {
    pub id: TokenId,
    /// The principal that minted it.
    pub issuer: String,
    /// blake3 of the task description ([`task_hash`]).
    pub task: [u8; 32],
    pub audience: Audience,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds; the token is invalid from this second on.
    pub expires: u64,
    pub max_uses: Option<u32>,
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub grants: Vec<Grant>,
    /// When set, the token is good for exactly this call ([`call_hash`]).
    pub call_hash: Option<[u8; 32]>,
    /// [`token_hash`] of the token this one was attenuated from.
    pub parent: Option<[u8; 32]>,
    /// Ids of every ancestor, root first, so revoking any of them revokes
    /// this token too.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub lineage: Vec<TokenId>,
}

/// The encoded form: the body's exact bytes and the signature over them.
#[derive(Serialize, Deserialize)]
struct SignedToken {
    #[serde(deserialize_with = "crate::bounded::vec")]
    body: Vec<u8>,
    #[serde(deserialize_with = "crate::bounded::vec")]
    signature: Vec<u8>,
}

/// Why a token string was rejected. Carries nothing from the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("not a keyward token (it must start with {TOKEN_PREFIX})")]
    Prefix,
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token is not valid base64url")]
    Base64,
    #[error("token is malformed ({0})")]
    Decode(DecodeError),
    #[error("token signature is not valid for this broker's key")]
    Signature,
    #[error("token id must be 32 hex digits")]
    BadId,
}

/// A token whose signature has been checked.
#[derive(Clone, Debug)]
pub struct Verified {
    pub body: TokenBody,
    /// [`token_hash`] of the token string.
    pub hash: [u8; 32],
}

/// Sign a body and encode the token string.
pub fn issue(body: &TokenBody, key: &SigningKey) -> String {
    let body_bytes = to_bytes(body);
    let signature = key.sign(&signing_input(&body_bytes));
    let signed = SignedToken {
        body: body_bytes,
        signature: signature.to_bytes().to_vec(),
    };
    let bytes = to_bytes(&signed);
    let mut out = String::with_capacity(TOKEN_PREFIX.len() + bytes.len() * 4 / 3 + 4);
    out.push_str(TOKEN_PREFIX);
    B64.encode_string(bytes, &mut out);
    out
}

/// Check a token string's signature and decode its body. Time, audience,
/// revocation and grants are the broker's to check.
pub fn verify(token: &str, key: &VerifyingKey) -> Result<Verified, TokenError> {
    let (bytes, signed) = unpack(token)?;
    let signature: [u8; 64] = signed
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| TokenError::Signature)?;
    key.verify_strict(
        &signing_input(&signed.body),
        &Signature::from_bytes(&signature),
    )
    .map_err(|_| TokenError::Signature)?;
    let body = decode::<TokenBody>(&signed.body).map_err(TokenError::Decode)?;
    Ok(Verified {
        body,
        hash: hash_bytes(&bytes),
    })
}

/// The body of a token *without* checking its signature: for display
/// only, never for a decision.
pub fn inspect(token: &str) -> Result<TokenBody, TokenError> {
    let (_, signed) = unpack(token)?;
    decode::<TokenBody>(&signed.body).map_err(TokenError::Decode)
}

fn unpack(token: &str) -> Result<(Vec<u8>, SignedToken), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    let encoded = token.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
    let bytes = B64.decode(encoded).map_err(|_| TokenError::Base64)?;
    let signed = decode::<SignedToken>(&bytes).map_err(TokenError::Decode)?;
    Ok((bytes, signed))
}

/// The postcard encoding of a value of this module's types.
///
/// Encoding them cannot fail: postcard's only serialization errors are a
/// full fixed buffer (a `Vec` grows instead), a sequence of unknown length
/// (every sequence here is a `Vec` or slice, whose length is known) and a
/// custom error raised by a hand-written `Serialize` (every type here
/// derives it). So a failure is a bug in this crate, and it panics rather
/// than sign an empty body or give every call the same hash, as falling
/// back to empty bytes would.
fn to_bytes<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encodes keyward's own derived types into a Vec")
}

fn signing_input(body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    input.extend_from_slice(SIGNING_CONTEXT);
    input.extend_from_slice(body);
    input
}

fn hash_bytes(bytes: &[u8]) -> [u8; 32] {
    blake3::derive_key(TOKEN_HASH_CONTEXT, bytes)
}

/// The hash of a token string (of its decoded bytes), as used in `parent`.
pub fn token_hash(token: &str) -> Result<[u8; 32], TokenError> {
    let (bytes, _) = unpack(token)?;
    Ok(hash_bytes(&bytes))
}

/// blake3 of a task description.
pub fn task_hash(task: &str) -> [u8; 32] {
    blake3::derive_key(TASK_HASH_CONTEXT, task.as_bytes())
}

/// The canonical hash of one call: blake3 over the postcard encoding of
/// the tool name and the parameters sorted by name.
pub fn call_hash(tool: &str, params: &[(String, Value)]) -> [u8; 32] {
    let mut sorted: Vec<&(String, Value)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let encoded = to_bytes(&(tool, sorted));
    blake3::derive_key(CALL_HASH_CONTEXT, &encoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hex_is_two_lower_case_digits_a_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let want: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&all), want);
        assert_eq!(hex(&[]), "");
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn body() -> TokenBody {
        TokenBody {
            id: TokenId([0x11; 16]),
            issuer: "orchestrator".into(),
            task: task_hash("summarise the report"),
            audience: Audience {
                uid: 1000,
                gid: None,
            },
            not_before: 1_800_000_000,
            expires: 1_800_000_300,
            max_uses: Some(3),
            grants: vec![Grant {
                tool: "send_email".into(),
                params: vec![ParamConstraint {
                    name: "to".into(),
                    constraint: Constraint::Exact(Value::Str("alice@example.com".into())),
                }],
            }],
            call_hash: None,
            parent: None,
            lineage: vec![],
        }
    }

    #[test]
    fn issue_and_verify() {
        let token = issue(&body(), &key());
        assert!(token.starts_with(TOKEN_PREFIX));
        let verified = verify(&token, &key().verifying_key()).unwrap();
        assert_eq!(verified.body, body());
        assert_eq!(verified.hash, token_hash(&token).unwrap());
        assert_eq!(inspect(&token).unwrap(), body());
    }

    /// The exact token for a known body and key: a format change must be
    /// a deliberate act.
    #[test]
    fn golden_token() {
        let token = issue(&body(), &key());
        assert_eq!(
            token,
            "kw1.cxEREREREREREREREREREREMb3JjaGVzdHJhdG9yDl77ByutGNVDWNlW9UuLVTQsZlbZevBQe8P4eyoSoKHoBwCApKfaBqymp9oGAQMBCnNlbmRfZW1haWwBAnRvAAARYWxpY2VAZXhhbXBsZS5jb20AAABAQVlcFmubxKmYUhyN3d2tV44moKZVyz8x0kdQ84LeBOwEoZNoHrWnauWiWmnmafavco0uoyG_BUvpDl1nx3OAAw"
        );
    }

    #[test]
    fn golden_hashes() {
        let params = vec![
            ("to".to_owned(), Value::Str("a@example.com".into())),
            ("n".to_owned(), Value::Int(2)),
        ];
        let mut reversed = params.clone();
        reversed.reverse();
        assert_eq!(call_hash("t", &params), call_hash("t", &reversed));
        assert_ne!(call_hash("t", &params), call_hash("u", &params));
        // Pinned: a change to the canonical call or task encoding breaks
        // every call_hash and task hash already issued.
        assert_eq!(
            hex(&call_hash("t", &params)),
            "d0505c171422c3e395f75c20b13d59940ff5d3d9cb1034cc260a048ccc934cf3"
        );
        assert_eq!(
            hex(&task_hash("")),
            "5f527020056b07441797fc5f04225e7148cc034febb8f8a87f25a8a81c94413a"
        );
    }

    #[test]
    fn rejects_other_key_prefix_and_garbage() {
        let token = issue(&body(), &key());
        let other = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
        assert_eq!(verify(&token, &other).unwrap_err(), TokenError::Signature);
        assert_eq!(
            verify(&token.replacen("kw1.", "kw2.", 1), &key().verifying_key()).unwrap_err(),
            TokenError::Prefix
        );
        assert_eq!(
            verify("kw1.!!!", &key().verifying_key()).unwrap_err(),
            TokenError::Base64
        );
        assert!(verify(&"kw1.".repeat(5000), &key().verifying_key()).is_err());
    }

    /// A value postcard cannot encode must stop the signer, not be signed
    /// (or hashed) as empty bytes. Every real type here encodes; this one
    /// fails on purpose, as a hand-written `Serialize` could.
    #[test]
    #[should_panic(expected = "postcard encodes")]
    fn an_encoding_failure_is_never_signed_as_empty_bytes() {
        struct Unencodable;
        impl Serialize for Unencodable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("cannot encode"))
            }
        }
        let bytes = to_bytes(&Unencodable);
        // Reached only if the failure was swallowed: show what would have
        // been signed.
        panic!("encoded as {bytes:?}");
    }

    #[test]
    fn token_ids_round_trip_through_hex() {
        let id = TokenId([0xab; 16]);
        assert_eq!(id.to_string().parse::<TokenId>().unwrap(), id);
        assert!("zz".parse::<TokenId>().is_err());
    }

    proptest! {
        #[test]
        fn any_single_bit_flip_is_rejected(index in 0usize..4096, bit in 0u8..8) {
            let token = issue(&body(), &key());
            let mut bytes = token.clone().into_bytes();
            let i = index % bytes.len();
            bytes[i] ^= 1 << bit;
            if let Ok(flipped) = String::from_utf8(bytes) {
                prop_assert!(verify(&flipped, &key().verifying_key()).is_err());
            }
        }

        #[test]
        fn any_bit_flip_in_decoded_bytes_is_rejected(index in 0usize..4096, bit in 0u8..8) {
            let token = issue(&body(), &key());
            let mut bytes = B64.decode(&token[TOKEN_PREFIX.len()..]).unwrap();
            let i = index % bytes.len();
            bytes[i] ^= 1 << bit;
            let flipped = format!("{TOKEN_PREFIX}{}", B64.encode(bytes));
            prop_assert!(verify(&flipped, &key().verifying_key()).is_err());
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let _ = verify(&s, &key().verifying_key());
            let _ = verify(&format!("{TOKEN_PREFIX}{s}"), &key().verifying_key());
        }
    }
}
