// SPDX-License-Identifier: Apache-2.0
//! The decoders the leak scanner normalises text with.
//!
//! Each takes one view (bytes) and returns what it decodes to, or `None`
//! when it finds nothing to decode. They are lenient on purpose: an
//! upstream that wants to smuggle a secret does not send valid JSON or
//! well-formed base64, and a truncated compressed stream still yields the
//! bytes before the cut. Every output buffer zeroizes on drop (it may hold
//! the secret); the decompressors' internal windows do not.

use std::io::Read;

use zeroize::Zeroizing;

/// Decoded bytes; wiped on drop.
pub type Bytes = Zeroizing<Vec<u8>>;

/// Separates the decoded runs of one view, so that two unrelated runs do
/// not read as one. (A credential with a NUL byte in a window could be
/// missed where it straddles two runs; none is expected.)
pub const RUN_SEPARATOR: u8 = 0;

/// The compression format whose magic starts at some offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zlib,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// Why a decompression gave up.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLarge;

/// Every offset in `view` where a compressed stream may start: the gzip
/// and zstd magics, and a zlib header with a 32 KiB window and no preset
/// dictionary (`78 01`, `78 5e`, `78 9c`, `78 da`: what every encoder
/// writes), anywhere in the view: a byte glued in front must not hide one.
pub fn compressed_starts(view: &[u8]) -> Vec<(usize, Compression)> {
    let mut starts = Vec::new();
    for (i, window) in view.windows(2).enumerate() {
        match window {
            [0x1f, 0x8b] if view.get(i + 2) == Some(&8) => starts.push((i, Compression::Gzip)),
            [0x28, 0xb5] if view.get(i + 2..i + 4) == Some(&[0x2f, 0xfd][..]) => {
                starts.push((i, Compression::Zstd))
            }
            [0x78, 0x01 | 0x5e | 0x9c | 0xda] => starts.push((i, Compression::Zlib)),
            _ => {}
        }
    }
    starts
}

/// Decompress the stream at the start of `input`, keeping whatever came
/// out before an error (a truncated or corrupt stream still yields its
/// first bytes). More than `cap` bytes of output is [`TooLarge`]: the
/// caller cannot judge what it did not read, so it must refuse.
pub fn decompress(input: &[u8], format: Compression, cap: usize) -> Result<Bytes, TooLarge> {
    decompress_metered(input, format, cap, usize::MAX).map(|(bytes, _)| bytes)
}

/// [`decompress`], reading at most `read_limit` bytes of `input` (the
/// stream then ends there, as if the input did); also returns how many
/// bytes the decompressor read.
pub fn decompress_metered(
    input: &[u8],
    format: Compression,
    cap: usize,
    read_limit: usize,
) -> Result<(Bytes, usize), TooLarge> {
    let mut metered = Metered {
        input,
        read: 0,
        limit: read_limit,
    };
    let out = match format {
        // The bufread decoders consume what they use of `metered`'s
        // buffer, no more: `read` is what the stream took, not a 32 KiB
        // read-ahead (which charged every two-byte zlib "magic" in a text,
        // `x^2`, 32 KiB and withheld ordinary pages).
        Compression::Gzip => read_capped(flate2::bufread::MultiGzDecoder::new(&mut metered), cap),
        Compression::Zlib => read_capped(flate2::bufread::ZlibDecoder::new(&mut metered), cap),
        Compression::Zstd => match ruzstd::decoding::StreamingDecoder::new(&mut metered) {
            Ok(decoder) => read_capped(decoder, cap),
            Err(_) => Ok(Zeroizing::new(Vec::new())),
        },
    }?;
    Ok((out, metered.read))
}

/// Input for a decompressor: counts what it takes, and ends once it has
/// taken `limit` bytes.
struct Metered<'a> {
    input: &'a [u8],
    read: usize,
    limit: usize,
}

impl Read for Metered<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(self.input.len())
            .min(self.limit.saturating_sub(self.read));
        buf[..n].copy_from_slice(&self.input[..n]);
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

impl std::io::BufRead for Metered<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        let n = self.input.len().min(self.limit.saturating_sub(self.read));
        Ok(&self.input[..n])
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.input.len());
        self.input = &self.input[n..];
        self.read += n;
    }
}

fn read_capped(mut reader: impl Read, cap: usize) -> Result<Bytes, TooLarge> {
    let mut out = Zeroizing::new(Vec::new());
    let mut chunk = Zeroizing::new([0u8; 8192]);
    loop {
        match reader.read(&mut chunk[..]) {
            Ok(0) | Err(_) => return Ok(out),
            Ok(n) => {
                if out.len() + n > cap {
                    return Err(TooLarge);
                }
                // Grow by hand: a reallocation must not leave an unwiped copy.
                if out.capacity() < out.len() + n {
                    let mut bigger =
                        Zeroizing::new(Vec::with_capacity((out.len() + n).max(2 * out.capacity())));
                    bigger.extend_from_slice(&out);
                    out = bigger;
                }
                out.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// One pass of the escapes text can carry a secret in, left to right:
/// JSON and JavaScript string escapes (`\"`, `\\`, `\/`, `\n`..., `\uXXXX`
/// with surrogate pairs, `\xHH`), percent-encoding (`%XX`, either case) and
/// HTML character references (named and numeric). A nested encoding (JSON
/// inside a JSON string, `%2541`) needs another pass: the caller recurses.
/// With `plus_is_space`, `+` also decodes to a space (form encoding).
pub fn unescape(view: &[u8], plus_is_space: bool) -> Option<Bytes> {
    let interesting = |b: &u8| matches!(b, b'\\' | b'%' | b'&') || (plus_is_space && *b == b'+');
    if !view.iter().any(interesting) {
        return None;
    }
    // Sized once: no reallocation leaves an unwiped copy behind. Every
    // escape decodes to fewer bytes than it takes, but for a few named
    // references (`&nGt;`: 5 bytes to 6), hence the quarter more.
    let mut out = Zeroizing::new(Vec::with_capacity(view.len() + view.len() / 4 + 8));
    let mut changed = false;
    let mut i = 0;
    while i < view.len() {
        // Copy up to the next byte that may start an escape in one go.
        let plain = view[i..]
            .iter()
            .position(interesting)
            .unwrap_or(view.len() - i);
        out.extend_from_slice(&view[i..i + plain]);
        i += plain;
        if i == view.len() {
            break;
        }
        let step = match view[i] {
            b'\\' => json_escape(&view[i..], &mut out),
            b'%' => percent_escape(&view[i..], &mut out),
            b'&' => html_reference(&view[i..], &mut out),
            b'+' if plus_is_space => {
                out.push(b' ');
                Some(1)
            }
            _ => None,
        };
        match step {
            Some(consumed) => {
                changed = true;
                i += consumed;
            }
            None => {
                out.push(view[i]);
                i += 1;
            }
        }
    }
    changed.then_some(out)
}

use crate::percent::{hex_digit as hex_value, hex_number as hex_u32};

fn push_char(c: char, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// `text` starts with a backslash: decode one escape, returning how many
/// bytes it took.
fn json_escape(text: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let simple = match text.get(1)? {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'\'' => b'\'',
        b'b' => 8,
        b'f' => 12,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        b'x' => {
            let value = hex_u32(text.get(2..4)?)?;
            out.push(u8::try_from(value).ok()?);
            return Some(4);
        }
        b'u' => {
            let unit = hex_u32(text.get(2..6)?)?;
            if (0xd800..0xdc00).contains(&unit) {
                // A high surrogate: with its low half, one character.
                if text.get(6..8) == Some(&b"\\u"[..]) {
                    if let Some(low) = text.get(8..12).and_then(hex_u32) {
                        if (0xdc00..0xe000).contains(&low) {
                            let code = 0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00);
                            push_char(char::from_u32(code)?, out);
                            return Some(12);
                        }
                    }
                }
            }
            push_char(char::from_u32(unit).unwrap_or('\u{fffd}'), out);
            return Some(6);
        }
        _ => return None,
    };
    out.push(simple);
    Some(2)
}

/// `text` starts with `%`: decode `%XX`.
fn percent_escape(text: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    out.push(crate::percent::percent_byte(text)?);
    Some(3)
}

/// Longest character reference considered (`&CounterClockwiseContourIntegral;`
/// is 33 bytes).
const MAX_REFERENCE: usize = 40;

/// `text` starts with `&`: decode one character reference, numeric (with
/// or without the `;` browsers forgive) or named (the full HTML table, via
/// `html-escape`).
fn html_reference(text: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    if text.get(1) == Some(&b'#') {
        let (digits_at, radix) = match text.get(2) {
            Some(b'x' | b'X') => (3, 16),
            _ => (2, 10),
        };
        let digits = text[digits_at..]
            .iter()
            .take(8)
            .take_while(|b| {
                if radix == 16 {
                    b.is_ascii_hexdigit()
                } else {
                    b.is_ascii_digit()
                }
            })
            .count();
        if digits == 0 {
            return None;
        }
        let number = std::str::from_utf8(&text[digits_at..digits_at + digits]).ok()?;
        let code = u32::from_str_radix(number, radix).ok()?;
        push_char(char::from_u32(code).unwrap_or('\u{fffd}'), out);
        let end = digits_at + digits;
        return Some(if text.get(end) == Some(&b';') {
            end + 1
        } else {
            end
        });
    }
    let end = text.iter().take(MAX_REFERENCE).position(|&b| b == b';')?;
    let name = &text[1..end];
    if name.is_empty() || !name.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let reference = std::str::from_utf8(&text[..=end]).ok()?;
    match html_escape::decode_html_entities(reference) {
        std::borrow::Cow::Owned(decoded) => {
            out.extend_from_slice(decoded.as_bytes());
            Some(end + 1)
        }
        std::borrow::Cow::Borrowed(_) => None,
    }
}

/// How a byte reads in base64 text: its 6-bit value (either alphabet),
/// whitespace (skipped: line-wrapped base64), or anything else (ends a
/// run).
const B64_SPACE: u8 = 0xfe;
const B64_OTHER: u8 = 0xff;
const BASE64_CLASS: [u8; 256] = {
    let mut table = [B64_OTHER; 256];
    let mut i = 0;
    while i < 64 {
        table[b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i] as usize] =
            i as u8;
        i += 1;
    }
    table[b'-' as usize] = 62;
    table[b'_' as usize] = 63;
    table[b' ' as usize] = B64_SPACE;
    table[b'\t' as usize] = B64_SPACE;
    table[b'\n' as usize] = B64_SPACE;
    table[b'\r' as usize] = B64_SPACE;
    table[0x0c] = B64_SPACE;
    table
};

/// The runs of `view` in one alphabet: `(values, run ends)` where each
/// run's values follow the previous run's end. Separators are dropped.
type Runs = (Bytes, Vec<usize>);

/// Split `view` into runs of the bytes `class` maps below `B64_SPACE`,
/// skipping bytes it maps to `B64_SPACE` and ending a run at any other;
/// runs shorter than `min` are dropped.
fn runs(view: &[u8], class: &[u8; 256], min: usize) -> Option<Runs> {
    let mut values = Zeroizing::new(Vec::with_capacity(view.len()));
    let mut ends = Vec::new();
    let mut start = 0;
    for &b in view {
        let c = class[usize::from(b)];
        if c < B64_SPACE {
            values.push(c);
        } else if c == B64_OTHER && values.len() > start {
            if values.len() - start >= min {
                ends.push(values.len());
                start = values.len();
            } else {
                values.truncate(start);
            }
        }
    }
    if values.len() - start >= min {
        ends.push(values.len());
    } else {
        values.truncate(start);
    }
    (!ends.is_empty()).then_some((values, ends))
}

/// The base64 runs of `view` — maximal stretches of base64 characters and
/// whitespace, the whitespace dropped (line-wrapped base64), either
/// alphabet — of at least `min_chars`, decoded starting at each character
/// offset 0 to 3 (where a run really starts is unknown: a word glued to
/// its front shifts it). One view per offset, its runs joined by
/// [`RUN_SEPARATOR`]; none if no run is long enough.
pub fn base64_runs(view: &[u8], min_chars: usize) -> Vec<Bytes> {
    let Some((sextets, ends)) = runs(view, &BASE64_CLASS, min_chars.max(2)) else {
        return Vec::new();
    };
    let mut views = Vec::with_capacity(4);
    for offset in 0..4 {
        // Sized once: no reallocation leaves an unwiped copy behind.
        let mut out = Zeroizing::new(Vec::with_capacity(sextets.len() * 3 / 4 + ends.len()));
        let mut start = 0;
        for &end in &ends {
            let run = &sextets[start..end];
            start = end;
            if run.len() < offset + 2 {
                continue;
            }
            if !out.is_empty() {
                out.push(RUN_SEPARATOR);
            }
            // Four sextets make three bytes; two or three trailing ones
            // one or two more; a lone trailing one less than a byte.
            let mut quads = run[offset..].chunks(4);
            for quad in &mut quads {
                let mut bits = 0u32;
                for (i, &v) in quad.iter().enumerate() {
                    bits |= u32::from(v) << (18 - 6 * i);
                }
                let bytes = bits.to_be_bytes();
                let take = match quad.len() {
                    4 => 3,
                    3 => 2,
                    2 => 1,
                    _ => 0,
                };
                out.extend_from_slice(&bytes[1..1 + take]);
            }
        }
        if !out.is_empty() {
            views.push(out);
        }
    }
    views
}

/// Hex digits' values; separators (`:`, `-`, `.`, `,`, `;`, whitespace)
/// skipped; anything else ends a run.
const HEX_CLASS: [u8; 256] = {
    let mut table = [B64_OTHER; 256];
    let mut b = 0;
    while b < 256 {
        if let Some(value) = hex_value(b as u8) {
            table[b] = value;
        }
        b += 1;
    }
    let separators = b":-.,; \t\n\r";
    let mut i = 0;
    while i < separators.len() {
        table[separators[i] as usize] = B64_SPACE;
        i += 1;
    }
    table
};

/// The hex runs of `view` — hex digits in either case, with or without
/// separators between them (`:`, `-`, `.`, `,`, `;`, whitespace, and
/// `\x` / `0x` prefixes) — of at least `min_digits` digits, decoded
/// starting at digit offset 0 and 1. One view per offset, its runs joined
/// by [`RUN_SEPARATOR`]; none if no run is long enough.
pub fn hex_runs(view: &[u8], min_digits: usize) -> Vec<Bytes> {
    // Drop `\x` and `0x` prefixes first: the `0` of `0x` is a digit.
    let has_prefix = view
        .windows(2)
        .any(|w| matches!(w, [b'0' | b'\\', b'x' | b'X']));
    let cleaned;
    let view = if has_prefix {
        let mut out = Zeroizing::new(Vec::with_capacity(view.len()));
        let mut i = 0;
        while i < view.len() {
            let b = view[i];
            let prefix = matches!(b, b'0' | b'\\')
                && matches!(view.get(i + 1), Some(b'x' | b'X'))
                && view.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
                && (b == b'\\' || i == 0 || !view[i - 1].is_ascii_hexdigit());
            if prefix {
                out.push(b' ');
                i += 2;
            } else {
                out.push(b);
                i += 1;
            }
        }
        cleaned = out;
        cleaned.as_slice()
    } else {
        view
    };
    let Some((nibbles, ends)) = runs(view, &HEX_CLASS, min_digits.max(2)) else {
        return Vec::new();
    };
    let mut views = Vec::with_capacity(2);
    for offset in 0..2 {
        let mut out = Zeroizing::new(Vec::with_capacity(nibbles.len() / 2 + ends.len()));
        let mut start = 0;
        for &end in &ends {
            let run = &nibbles[start..end];
            start = end;
            if run.len() < offset + 2 {
                continue;
            }
            if !out.is_empty() {
                out.push(RUN_SEPARATOR);
            }
            for pair in run[offset..].chunks_exact(2) {
                out.push(pair[0] << 4 | pair[1]);
            }
        }
        if !out.is_empty() {
            views.push(out);
        }
    }
    views
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use base64::Engine as _;

    use super::*;

    #[test]
    fn unescape_json_percent_html() {
        let text =
            br#"a\"\\\/\u0041\ud83d\ude00\x42%41%2f&amp;&#65;&#x42;&#67&lt;&sol;&nosuch; %zz \q"#;
        let out = unescape(text, false).unwrap();
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            "a\"\\/A\u{1f600}BA/&ABC</&nosuch; %zz \\q"
        );
        assert!(unescape(b"nothing to see", false).is_none());
        assert!(unescape(b"50% off & \\q", false).is_none());
        assert_eq!(&unescape(b"a+b", true).unwrap()[..], b"a b");
        assert!(unescape(b"a+b", false).is_none());
        // One level per pass.
        let nested = unescape(br#"\\u0041 %2541"#, false).unwrap();
        assert_eq!(&nested[..], br#"\u0041 %41"#);
    }

    #[test]
    fn base64_runs_strip_whitespace_and_find_every_offset() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(b"the secret value");
        let wrapped = format!("x: {}\r\n {}", &encoded[..7], &encoded[7..]);
        let out = base64_runs(wrapped.as_bytes(), 8);
        assert_eq!(&out[0][..], b"the secret value");
        // A word glued to the front shifts the run by its length.
        let glued = format!("key{encoded}");
        let found = base64_runs(glued.as_bytes(), 8)
            .iter()
            .any(|d| d.windows(16).any(|w| w == b"the secret value"));
        assert!(found);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xfb, 0xff, 0xfe, 1]);
        assert_eq!(
            &base64_runs(url.as_bytes(), 4)[0][..],
            [0xfb, 0xff, 0xfe, 1]
        );
        assert!(base64_runs(b"short, runs; only", 8).is_empty());
    }

    #[test]
    fn hex_runs_with_and_without_separators() {
        for text in [
            "7365637265742d76616c7565",
            "73:65:63:72:65:74:2D:76:61:6C:75:65",
            "73 65 63 72 65 74 2d 76 61 6c 75 65",
            "\\x73\\x65\\x63\\x72\\x65\\x74\\x2d\\x76\\x61\\x6c\\x75\\x65",
            "0x73, 0x65, 0x63, 0x72, 0x65, 0x74, 0x2d, 0x76, 0x61, 0x6c, 0x75, 0x65",
        ] {
            let out = hex_runs(text.as_bytes(), 16);
            assert_eq!(&out[0][..], b"secret-value", "{text}");
        }
        let odd = hex_runs(b"z a7365637265742d76616c7565", 16);
        assert_eq!(&odd[1][..], b"secret-value");
        assert!(hex_runs(b"cafe", 16).is_empty());
    }

    #[test]
    fn decompression_keeps_a_truncated_stream_and_caps_a_bomb() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&b"leaked value ".repeat(100)).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(compressed_starts(&gz), vec![(0, Compression::Gzip)]);
        let out = decompress(&gz, Compression::Gzip, 1 << 20).unwrap();
        assert_eq!(out.len(), 1300);
        let cut = decompress(&gz[..gz.len() - 10], Compression::Gzip, 1 << 20).unwrap();
        assert!(cut.starts_with(b"leaked value"), "{}", cut.len());

        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; 10 << 20]).unwrap();
        let bomb = z.finish().unwrap();
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        assert_eq!(compressed_starts(&bomb)[0], (0, Compression::Zlib));
        assert_eq!(decompress(&bomb, Compression::Zlib, 1 << 20), Err(TooLarge));

        let zstd = ruzstd::encoding::compress_to_vec(
            &b"zstd leaked value"[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert_eq!(compressed_starts(&zstd), vec![(0, Compression::Zstd)]);
        let out = decompress(&zstd, Compression::Zstd, 1 << 20).unwrap();
        assert_eq!(&out[..], b"zstd leaked value");
    }
}
