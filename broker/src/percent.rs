// SPDX-License-Identifier: Apache-2.0
//! Percent and hex decoding, in one place: the leak scanner's escapes and
//! hex runs ([`crate::leak::decode`]), the path-segment checks
//! ([`crate::param::path`]) and the URL templates' dot-segment check
//! ([`crate::template`]) all read `%XX` and hex digits through these
//! functions, so that they cannot disagree on what a `%` means.
//!
//! Lenient by design: a `%` not followed by two hex digits is not an
//! escape (it stays as is), as every server reads it.

/// The value of one hex digit, either case.
pub const fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The value of a run of hex digits; `None` if it is empty, holds anything
/// else, or overflows a `u32`.
pub fn hex_number(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u32, |acc, &d| {
        acc.checked_mul(16)?.checked_add(u32::from(hex_digit(d)?))
    })
}

/// `%XX` at the start of `text`: the byte (3 bytes of input).
pub fn percent_byte(text: &[u8]) -> Option<u8> {
    match text {
        [b'%', hi, lo, ..] => Some(hex_digit(*hi)? << 4 | hex_digit(*lo)?),
        _ => None,
    }
}

/// IIS's `%uXXXX` at the start of `text` (either case of `u`): the UTF-16
/// code unit (6 bytes of input).
pub fn percent_unicode(text: &[u8]) -> Option<u32> {
    match text {
        [b'%', b'u' | b'U', rest @ ..] => hex_number(rest.get(..4)?),
        _ => None,
    }
}

/// One round of `%XX` decoding; `None` when there is nothing to decode.
pub fn percent_decode(text: &[u8]) -> Option<Vec<u8>> {
    if !text.contains(&b'%') {
        return None;
    }
    let mut out = Vec::with_capacity(text.len());
    let mut changed = false;
    let mut i = 0;
    while i < text.len() {
        match percent_byte(&text[i..]) {
            Some(byte) => {
                out.push(byte);
                changed = true;
                i += 3;
            }
            None => {
                out.push(text[i]);
                i += 1;
            }
        }
    }
    changed.then_some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn digits_numbers_and_escapes() {
        assert_eq!(hex_digit(b'7'), Some(7));
        assert_eq!(hex_digit(b'b'), Some(11));
        assert_eq!(hex_digit(b'F'), Some(15));
        assert_eq!(hex_digit(b'g'), None);
        assert_eq!(hex_number(b"1f600"), Some(0x1f600));
        assert_eq!(hex_number(b""), None);
        assert_eq!(hex_number(b"123456789"), None);
        assert_eq!(percent_byte(b"%2Fx"), Some(b'/'));
        assert_eq!(percent_byte(b"%2f"), Some(b'/'));
        assert_eq!(percent_byte(b"%2"), None);
        assert_eq!(percent_byte(b"%zz"), None);
        assert_eq!(percent_byte(b"2F"), None);
        assert_eq!(percent_unicode(b"%u002f"), Some(0x2f));
        assert_eq!(percent_unicode(b"%U002F."), Some(0x2f));
        assert_eq!(percent_unicode(b"%u02f"), None);
        assert_eq!(percent_decode(b"a%2Fb%2e%zz%").unwrap(), b"a/b.%zz%");
        assert_eq!(percent_decode(b"%252e").unwrap(), b"%2e");
        assert_eq!(percent_decode(b"plain"), None);
        assert_eq!(percent_decode(b"50% off"), None);
    }
}
