// SPDX-License-Identifier: Apache-2.0
//! Redaction of credential values and their encodings.
//!
//! An upstream may echo what it received (a debug endpoint, an error page
//! quoting the request, a reflected header). Before anything an executor
//! produced leaves the broker, every occurrence of a credential in the
//! forms it is commonly re-encoded in is replaced by [`REDACTED`]:
//!
//! - the raw bytes, and their lower- and upper-case hex;
//! - base64, standard and URL-safe alphabets, padded and unpadded;
//! - the secret inside a longer base64 blob (e.g. `Basic base64(user:secret)`
//!   or a JSON document that was base64-encoded): at byte offset 0, 1 or 2
//!   modulo 3 the secret's bits land differently on base64 characters, so
//!   for each alignment the characters fully determined by the secret are a
//!   pattern of their own;
//! - the JSON string-escaped form (with the variants common encoders
//!   produce: `\/`, `\uXXXX` for non-ASCII, HTML-safe `\u003c`);
//! - percent-encoding with any mix of raw and `%XX` bytes in either hex
//!   case, and `+` for a space.
//!
//! Fixed forms go through one Aho-Corasick automaton (leftmost-longest, so
//! a full encoding wins over its own fragment); percent-encodings, whose
//! mixes are too many to list, through one byte regex. Text that matches
//! nothing comes out byte for byte the same.
//!
//! Limits: an encoding not listed here (base32, compression, a reversed or
//! split value) and a fragment of a value are not recognised here: what
//! redaction leaves is judged by [`crate::leak`], which withholds the whole
//! response if any fragment remains in any encoding it normalises. The
//! automaton and the regex hold copies of the patterns that are not
//! zeroized on drop.

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use zeroize::Zeroizing;

/// What every match is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Values longer than this get fixed percent-encoded forms only, not the
/// any-mix regex (whose size grows with the value).
const MAX_REGEX_VALUE: usize = 1024;

/// Total pattern bytes above which the automaton is an NFA, not a DFA.
const MAX_DFA_PATTERN_BYTES: usize = 16 * 1024;

/// The redactor could not be built (the automaton or regex grew too big).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RedactError(String);

/// Replaces every known encoding of a set of secret values.
#[derive(Default)]
pub struct Redactor {
    fixed: Option<AhoCorasick>,
    /// Raw values only, ASCII case-insensitive: for text the upstream may
    /// have case-folded, such as HTTP header names.
    folded: Option<AhoCorasick>,
    encoded: Option<regex::bytes::Regex>,
    values: usize,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("values", &self.values)
            .finish_non_exhaustive()
    }
}

impl Redactor {
    /// A redactor for these values. Empty values are ignored (they would
    /// match everywhere).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<Redactor, RedactError> {
        let mut fixed: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut encoded = Zeroizing::new(String::new());
        let mut raw: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        for value in values.into_iter().filter(|v| !v.is_empty()) {
            raw.push(Zeroizing::new(value.to_vec()));
            add_fixed_forms(value, &mut fixed);
            if value.len() <= MAX_REGEX_VALUE {
                if !encoded.is_empty() {
                    encoded.push('|');
                }
                push_percent_regex(value, &mut encoded);
            }
        }
        fixed.retain(|p| !p.is_empty());
        fixed.sort_unstable_by(|a, b| a.as_slice().cmp(b.as_slice()));
        fixed.dedup_by(|a, b| a.as_slice() == b.as_slice());
        let fixed = automaton(fixed.iter().map(|p| p.as_slice()), false)?;
        let folded = automaton(raw.iter().map(|p| p.as_slice()), true)?;
        let encoded = if encoded.is_empty() {
            None
        } else {
            let regex = regex::bytes::RegexBuilder::new(&encoded)
                .unicode(false)
                .size_limit(64 << 20)
                .build()
                // The regex error would quote the pattern, i.e. the secret.
                .map_err(|_| RedactError("percent-encoding regex too large".to_owned()))?;
            Some(regex)
        };
        Ok(Redactor {
            fixed,
            folded,
            encoded,
            values: raw.len(),
        })
    }

    /// Whether any value is covered.
    pub fn is_empty(&self) -> bool {
        self.values == 0
    }

    /// `input` with every match replaced by [`REDACTED`].
    pub fn redact_bytes(&self, input: &[u8]) -> Vec<u8> {
        let once = match &self.fixed {
            Some(ac) => replace_all(ac, input),
            None => input.to_vec(),
        };
        match &self.encoded {
            Some(re) if re.is_match(&once) => {
                re.replace_all(&once, REDACTED.as_bytes()).into_owned()
            }
            _ => once,
        }
    }

    /// `input` with every match replaced by [`REDACTED`]. A secret that is
    /// not valid UTF-8 can match inside a character; what remains of that
    /// character becomes U+FFFD.
    pub fn redact_str(&self, input: &str) -> String {
        let bytes = self.redact_bytes(input.as_bytes());
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// Like [`Redactor::redact_str`], but raw values also match in any
    /// ASCII case. For text that may have been case-folded on the way,
    /// such as HTTP header names (which arrive lower-cased).
    pub fn redact_str_any_case(&self, input: &str) -> String {
        let once = self.redact_bytes(input.as_bytes());
        let twice = match &self.folded {
            Some(ac) => replace_all(ac, &once),
            None => once,
        };
        match String::from_utf8(twice) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

/// `haystack` with every match of `ac` replaced by [`REDACTED`].
fn replace_all(ac: &AhoCorasick, haystack: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    ac.replace_all_with_bytes(haystack, &mut out, |_, _, dst| {
        dst.extend_from_slice(REDACTED.as_bytes());
        true
    });
    out
}

/// A leftmost-longest automaton over `patterns`, or `None` if there are none.
fn automaton<'a>(
    patterns: impl Iterator<Item = &'a [u8]>,
    ascii_case_insensitive: bool,
) -> Result<Option<AhoCorasick>, RedactError> {
    let patterns: Vec<&[u8]> = patterns.collect();
    if patterns.is_empty() {
        return Ok(None);
    }
    // A DFA (what the builder picks for few patterns) has a row per byte
    // of pattern: fine for tokens, too big and slow to build for keys.
    let total: usize = patterns.iter().map(|p| p.len()).sum();
    let kind = (total > MAX_DFA_PATTERN_BYTES).then_some(AhoCorasickKind::ContiguousNFA);
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .ascii_case_insensitive(ascii_case_insensitive)
        .kind(kind)
        .build(patterns)
        .map(Some)
        .map_err(|e| RedactError(format!("automaton: {e}")))
}

/// Every fixed (non-percent) form of one value.
fn add_fixed_forms(value: &[u8], out: &mut Vec<Zeroizing<Vec<u8>>>) {
    let mut texts: Vec<Zeroizing<String>> = Vec::new();
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        texts.push(Zeroizing::new(engine.encode(value)));
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for offset in 0..3 {
            texts.push(shifted_base64(engine, value, offset));
        }
    }
    if let Ok(text) = std::str::from_utf8(value) {
        texts.push(Zeroizing::new(text.to_owned()));
    }
    // Each text form, and its JSON-escaped variants.
    for text in &texts {
        for variant in json_variants(text) {
            out.push(Zeroizing::new(variant.as_bytes().to_vec()));
        }
    }
    out.push(Zeroizing::new(value.to_vec()));
    out.push(Zeroizing::new(hex(value, b"0123456789abcdef").into_bytes()));
    out.push(Zeroizing::new(hex(value, b"0123456789ABCDEF").into_bytes()));
    // Fixed percent-encodings, for values too long for the regex.
    for upper in [false, true] {
        for form in [false, true] {
            out.push(Zeroizing::new(percent(value, upper, form).into_bytes()));
        }
    }
}

/// The base64 characters fully determined by `value` when it starts at
/// byte `offset` (0, 1 or 2) of a longer base64-encoded blob.
fn shifted_base64(
    engine: &base64::engine::GeneralPurpose,
    value: &[u8],
    offset: usize,
) -> Zeroizing<String> {
    let mut data = Zeroizing::new(vec![0u8; offset]);
    data.extend_from_slice(value);
    let encoded = Zeroizing::new(engine.encode(data.as_slice()));
    let start_bit = 8 * offset;
    let end_bit = 8 * (offset + value.len());
    // Character i covers bits [6i, 6i + 6).
    let first = start_bit.div_ceil(6);
    let end = end_bit / 6;
    Zeroizing::new(encoded.get(first..end).unwrap_or_default().to_owned())
}

/// The JSON string-escaped forms of `text` (without quotes): serde_json's,
/// and with `\/`, ASCII-only `\uXXXX`, HTML-safe escapes and upper-case
/// hex, as other encoders write them. Includes `text` itself when nothing
/// needs escaping.
fn json_variants(text: &str) -> Vec<Zeroizing<String>> {
    let mut out = Vec::new();
    for bits in 0..16u8 {
        let opts = JsonEscape {
            slash: bits & 1 != 0,
            ascii: bits & 2 != 0,
            html: bits & 4 != 0,
            upper: bits & 8 != 0,
        };
        let escaped = opts.escape(text);
        if !out.contains(&escaped) {
            out.push(escaped);
        }
    }
    out
}

#[derive(Clone, Copy)]
struct JsonEscape {
    slash: bool,
    ascii: bool,
    html: bool,
    upper: bool,
}

impl JsonEscape {
    fn escape(self, text: &str) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(text.len() + 8));
        let mut units = [0u16; 2];
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '/' if self.slash => out.push_str("\\/"),
                '<' | '>' | '&' | '\u{2028}' | '\u{2029}' if self.html => {
                    self.unicode(c as u16, &mut out)
                }
                c if (c as u32) < 0x20 => self.unicode(c as u16, &mut out),
                c if self.ascii && !c.is_ascii() => {
                    for unit in c.encode_utf16(&mut units) {
                        self.unicode(*unit, &mut out);
                    }
                }
                c => out.push(c),
            }
        }
        out
    }

    fn unicode(self, unit: u16, out: &mut String) {
        let digits: &[u8; 16] = if self.upper {
            b"0123456789ABCDEF"
        } else {
            b"0123456789abcdef"
        };
        out.push_str("\\u");
        for shift in [12, 8, 4, 0] {
            out.push(char::from(digits[usize::from((unit >> shift) & 0xf)]));
        }
    }
}

fn hex(value: &[u8], digits: &[u8; 16]) -> String {
    let mut out = String::with_capacity(value.len() * 2);
    for b in value {
        out.push(char::from(digits[usize::from(b >> 4)]));
        out.push(char::from(digits[usize::from(b & 0xf)]));
    }
    out
}

/// Percent-encoding of every byte outside ALPHA DIGIT `-._~`; with `form`,
/// a space is `+` (application/x-www-form-urlencoded).
fn percent(value: &[u8], upper: bool, form: bool) -> String {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = String::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else if form && b == b' ' {
            out.push('+');
        } else {
            out.push('%');
            out.push(char::from(digits[usize::from(b >> 4)]));
            out.push(char::from(digits[usize::from(b & 0xf)]));
        }
    }
    out
}

/// A regex (for `regex::bytes` with Unicode off) matching `value` with
/// each byte either raw or `%XX` in any hex case, and a space also as `+`.
fn push_percent_regex(value: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    out.push_str("(?:");
    for &b in value {
        let hi = char::from(DIGITS[usize::from(b >> 4)]);
        let lo = char::from(DIGITS[usize::from(b & 0xf)]);
        out.push_str("(?:\\x");
        out.push(hi);
        out.push(lo);
        if b == b' ' {
            out.push_str("|\\+");
        }
        out.push_str("|%");
        for d in [hi, lo] {
            if d.is_ascii_alphabetic() {
                out.push('[');
                out.push(d);
                out.push(d.to_ascii_lowercase());
                out.push(']');
            } else {
                out.push(d);
            }
        }
        out.push(')');
    }
    out.push(')');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-live/Ab+c d=\"q\"\\é<1>";

    fn redactor(values: &[&str]) -> Redactor {
        Redactor::new(values.iter().map(|v| v.as_bytes())).unwrap()
    }

    /// Redacting `text` removes every trace: it contains the marker and
    /// no longer contains `needle`.
    fn assert_gone(r: &Redactor, text: &str, needle: &str) {
        let out = r.redact_str(text);
        assert!(out.contains(REDACTED), "{text:?} -> {out:?}");
        assert!(!out.contains(needle), "{text:?} -> {out:?}");
    }

    #[test]
    fn raw_value_and_lossless_elsewhere() {
        let r = redactor(&[SECRET]);
        let text = format!("before {SECRET} middle {SECRET}after ünïcode");
        assert_eq!(
            r.redact_str(&text),
            "before [REDACTED] middle [REDACTED]after ünïcode"
        );
        let plain = "nothing here: sk-live/Ab+c d=, %2F, c2stbGl2ZQ";
        assert_eq!(r.redact_str(plain), plain);
        let binary: Vec<u8> = (0..=255).collect();
        assert_eq!(r.redact_bytes(&binary), binary);
        assert!(!r.is_empty());
    }

    #[test]
    fn empty_redactor_is_identity() {
        let r = Redactor::new([&b""[..]]).unwrap();
        assert!(r.is_empty());
        assert_eq!(r.redact_str("abc"), "abc");
        assert_eq!(Redactor::default().redact_bytes(b"abc"), b"abc");
    }

    #[test]
    fn base64_all_alphabets_and_padding() {
        let r = redactor(&[SECRET]);
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            let encoded = engine.encode(SECRET);
            let out = r.redact_str(&format!("x {encoded} y"));
            assert_eq!(out, "x [REDACTED] y", "{encoded}");
        }
    }

    #[test]
    fn secret_inside_a_longer_base64_blob_at_each_offset() {
        let r = redactor(&[SECRET]);
        for prefix_len in 0..6 {
            for suffix_len in 0..4 {
                let mut blob = vec![b'P'; prefix_len];
                blob.extend_from_slice(SECRET.as_bytes());
                blob.extend(std::iter::repeat_n(b'S', suffix_len));
                for engine in [&STANDARD, &URL_SAFE_NO_PAD] {
                    let encoded = engine.encode(&blob);
                    let out = r.redact_str(&encoded);
                    assert!(out.contains(REDACTED), "{prefix_len}/{suffix_len}: {out}");
                    // At most the two characters at each edge that mix
                    // secret bits with neighbouring bits may remain.
                    let kept = out.len() - REDACTED.len();
                    assert!(
                        kept + 4 * SECRET.len() / 3 <= encoded.len() + 4,
                        "{prefix_len}/{suffix_len}: {encoded} -> {out}"
                    );
                }
            }
        }
    }

    #[test]
    fn basic_auth_pair() {
        let pair = format!("alice:{SECRET}");
        let r = redactor(&[SECRET, &pair]);
        let header = format!("Basic {}", STANDARD.encode(&pair));
        assert_eq!(r.redact_str(&header), "Basic [REDACTED]");
        // Without the pair, the shifted fragment still hides the secret.
        let r = redactor(&[SECRET]);
        let out = r.redact_str(&header);
        assert!(out.starts_with("Basic YWxpY2U6"), "{out}");
        assert!(out.contains(REDACTED), "{out}");
    }

    #[test]
    fn percent_encodings() {
        let r = redactor(&[SECRET]);
        let strict = percent(SECRET.as_bytes(), true, false);
        assert!(
            strict.contains("%2F") && strict.contains("%C3%A9"),
            "{strict}"
        );
        for text in [
            strict.clone(),
            percent(SECRET.as_bytes(), false, false),
            percent(SECRET.as_bytes(), true, true),
            percent(SECRET.as_bytes(), false, true),
            // Python's quote(): '/' kept raw, the rest encoded.
            strict.replace("%2F", "/"),
            // Mixed-case hex and a needlessly encoded letter.
            strict.replacen("%2F", "%2f", 1).replacen("s", "%73", 1),
        ] {
            assert_eq!(
                r.redact_str(&format!("q={text}&x")),
                "q=[REDACTED]&x",
                "{text}"
            );
        }
    }

    #[test]
    fn long_value_gets_fixed_percent_forms() {
        let long = "a/b ".repeat(400);
        let r = redactor(&[&long]);
        assert!(r.encoded.is_none());
        let text = percent(long.as_bytes(), false, true);
        assert_eq!(r.redact_str(&text), REDACTED);
    }

    #[test]
    fn json_escaped_forms() {
        let r = redactor(&[SECRET]);
        let serde = serde_json::to_string(SECRET).unwrap();
        assert_eq!(r.redact_str(&serde), "\"[REDACTED]\"");
        let php = serde.replace('/', "\\/");
        assert_eq!(r.redact_str(&php), "\"[REDACTED]\"");
        let python = "\"sk-live/Ab+c d=\\\"q\\\"\\\\\\u00e9<1>\"";
        assert_eq!(r.redact_str(python), "\"[REDACTED]\"");
        let go = "\"sk-live/Ab+c d=\\\"q\\\"\\\\é\\u003c1\\u003e\"";
        assert_eq!(r.redact_str(go), "\"[REDACTED]\"");
    }

    #[test]
    fn json_echo_of_request_headers() {
        let token = "ghp_0123456789abcdefABCDEF";
        let pair = format!("bob:{token}");
        let r = redactor(&[token, &pair]);
        let echo = serde_json::json!({
            "headers": {
                "Authorization": format!("Bearer {token}"),
                "X-Basic": format!("Basic {}", STANDARD.encode(&pair)),
                "X-Api-Key": token,
                "X-Url": format!("https://h/?k={}", percent(token.as_bytes(), false, false)),
            },
            "args": {"q": "ordinary"},
        })
        .to_string();
        let out = r.redact_str(&echo);
        assert!(!out.contains(token), "{out}");
        assert!(!out.contains(&STANDARD.encode(&pair)), "{out}");
        assert_eq!(out.matches(REDACTED).count(), 4, "{out}");
        assert!(out.contains("\"q\":\"ordinary\""), "{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap();
    }

    #[test]
    fn any_case_for_header_names() {
        let r = redactor(&["Tok_ABCdef0123456789"]);
        assert_eq!(
            r.redact_str_any_case("x-leak-tok_abcdef0123456789"),
            "x-leak-[REDACTED]"
        );
        assert_eq!(r.redact_str_any_case("content-type"), "content-type");
    }

    #[test]
    fn hex_forms() {
        let r = redactor(&[SECRET]);
        assert_gone(
            &r,
            &hex(SECRET.as_bytes(), b"0123456789abcdef"),
            "6b2d6c697665",
        );
        assert_gone(
            &r,
            &hex(SECRET.as_bytes(), b"0123456789ABCDEF"),
            "6B2D6C697665",
        );
    }

    #[test]
    fn several_values_and_non_utf8_secret() {
        let binary = [0xffu8, 0xfe, 0x00, 0x41, 0x42, 0x80, 0x81, 0x82];
        let r = Redactor::new([&binary[..], b"second-secret"]).unwrap();
        let mut text = b"a".to_vec();
        text.extend_from_slice(&binary);
        text.extend_from_slice(b"b second-secret c ");
        text.extend_from_slice(STANDARD.encode(binary).as_bytes());
        assert_eq!(
            r.redact_bytes(&text),
            b"a[REDACTED]b [REDACTED] c [REDACTED]".to_vec()
        );
        assert!(!format!("{r:?}").contains("second"));
    }
}
