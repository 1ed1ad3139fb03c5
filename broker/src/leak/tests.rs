// SPDX-License-Identifier: Apache-2.0
//! Unit and property tests of the leak scanner.

use std::io::Write;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use proptest::prelude::*;

use super::*;

/// 32 characters: an 8-byte window.
const KEY: &str = "kw_live_9fQ2xL7mZpR4tV1sB8nC3yH6";

fn scanner(secrets: &[&str]) -> LeakScanner {
    LeakScanner::new(secrets.iter().map(|s| s.as_bytes())).unwrap()
}

fn found(result: Result<(), Leak>) -> bool {
    matches!(result, Err(Leak::Found { .. }))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// Base64 wrapped at `column` with CRLF, as MIME does.
fn wrapped_base64(data: &[u8], column: usize) -> String {
    let encoded = STANDARD.encode(data);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(column)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    lines.join("\r\n")
}

fn hex_with(data: &[u8], separator: &str, upper: bool) -> String {
    data.iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect::<Vec<_>>()
        .join(separator)
}

/// Every character as `\uXXXX` (surrogate pairs beyond the BMP).
fn json_u(text: &str) -> String {
    let mut units = [0u16; 2];
    text.chars()
        .flat_map(|c| {
            c.encode_utf16(&mut units)
                .iter()
                .map(|u| format!("\\u{u:04x}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn percent_all(data: &[u8]) -> String {
    data.iter().map(|b| format!("%{b:02X}")).collect()
}

fn html_numeric(text: &str) -> String {
    text.chars().map(|c| format!("&#{};", c as u32)).collect()
}

#[test]
fn window_lengths() {
    assert_eq!(window_len(5), 5);
    assert_eq!(window_len(8), 8);
    assert_eq!(window_len(32), 8);
    assert_eq!(window_len(36), 9);
    assert_eq!(window_len(64), 16);
    assert_eq!(window_len(128), 32);
    assert_eq!(window_len(64 * 1024), 32);
}

#[test]
fn a_partial_quote_is_caught() {
    let s = scanner(&[KEY]);
    let body = format!(
        r#"{{"error":"invalid api key {}","status":401}}"#,
        &KEY[..KEY.len() - 2]
    );
    assert!(found(s.check(body.as_bytes())));
    // Any 8 bytes of it, in any case.
    for start in 0..=KEY.len() - 8 {
        let text = format!("x {} y", KEY[start..start + 8].to_ascii_uppercase());
        assert!(found(s.check(text.as_bytes())), "{start}");
    }
    // Seven bytes are not enough.
    assert_eq!(s.check(format!("x {} y", &KEY[3..10]).as_bytes()), Ok(()));
}

#[test]
fn every_encoding_of_the_issue_is_caught() {
    let s = scanner(&[KEY]);
    let doc = format!(r#"{{"debug":{{"authorization":"Bearer {KEY}"}}}}"#);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("gzip without content-encoding", gzip(doc.as_bytes())),
        ("zlib", zlib(doc.as_bytes())),
        ("zstd", zstd(doc.as_bytes())),
        (
            "base64 wrapped at 76",
            wrapped_base64(format!("{}{doc}", "p".repeat(40)).as_bytes(), 76).into_bytes(),
        ),
        (
            "hex with colons",
            hex_with(doc.as_bytes(), ":", true).into_bytes(),
        ),
        (
            "hex plain lower",
            hex_with(doc.as_bytes(), "", false).into_bytes(),
        ),
        (
            "json every char \\u",
            format!(r#"{{"v":"{}"}}"#, json_u(&doc)).into_bytes(),
        ),
        (
            "json in json",
            serde_json::to_string(&serde_json::json!({"inner": doc}))
                .unwrap()
                .into_bytes(),
        ),
        (
            "json in json in json",
            serde_json::to_string(&serde_json::json!({
                "a": serde_json::to_string(&serde_json::json!({"inner": json_u(&doc)})).unwrap()
            }))
            .unwrap()
            .into_bytes(),
        ),
        ("percent", percent_all(doc.as_bytes()).into_bytes()),
        (
            "double percent",
            percent_all(percent_all(doc.as_bytes()).as_bytes()).into_bytes(),
        ),
        ("html numeric", html_numeric(&doc).into_bytes()),
        (
            "html named",
            KEY.replace('_', "&lowbar;")
                .replace('l', "&#x6C;")
                .into_bytes(),
        ),
        (
            "base64url of gzip, in json",
            format!(
                r#"{{"blob":"{}"}}"#,
                URL_SAFE_NO_PAD.encode(gzip(doc.as_bytes()))
            )
            .into_bytes(),
        ),
        (
            "gzip after a prefix",
            [b"garbage-prefix".as_slice(), &gzip(doc.as_bytes())].concat(),
        ),
        ("truncated gzip", {
            // The secret early, then text that does not compress.
            let tail: String = (0..4000u32)
                .map(|i| format!("{:x}", i.wrapping_mul(2654435761)))
                .collect();
            let z = gzip(format!("{doc}{tail}").as_bytes());
            z[..z.len() - 100].to_vec()
        }),
    ];
    for (what, body) in cases {
        let result = s.check(&body);
        assert!(found(result.clone()), "{what}: {result:?}");
        // The message names where and how, never the content.
        let message = result.unwrap_err().to_string();
        assert!(!message.contains(&KEY[..8]), "{what}: {message}");
    }
}

#[test]
fn the_message_names_the_decoders() {
    let s = scanner(&[KEY]);
    let body = STANDARD.encode(gzip(KEY.as_bytes()));
    let err = s.check_response([], body.as_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the response contains credential material (in the body, decoded as base64, gzip)"
    );
}

#[test]
fn a_secret_split_over_headers_is_caught() {
    let s = scanner(&[KEY]);
    // Pieces shorter than a window, in two headers of one name.
    let (a, b) = KEY.split_at(5);
    let (b, c) = b.split_at(6);
    let headers: Vec<(&[u8], &[u8])> = vec![
        (b"content-type", b"text/plain"),
        (b"x-part", a.as_bytes()),
        (b"x-part", b.as_bytes()),
        (b"x-part", c.as_bytes()),
    ];
    assert!(found(s.check_response(headers.clone(), b"ok")));
    assert_eq!(s.check_response(headers[..2].to_vec(), b"ok"), Ok(()));
    // In a header name (lower-cased on the way).
    let name = format!("x-{}", KEY.to_ascii_lowercase());
    let named: Vec<(&[u8], &[u8])> = vec![(name.as_bytes(), b"1")];
    assert!(found(s.check_response(named, b"ok")));
}

#[test]
fn a_decompression_bomb_is_refused_not_expanded() {
    let s = scanner(&[KEY]);
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..(MAX_INFLATED / (1 << 20) + 1) {
        z.write_all(&vec![b'a'; 1 << 20]).unwrap();
    }
    let bomb = z.finish().unwrap();
    assert!(bomb.len() < 60 * 1024, "{}", bomb.len());
    assert_eq!(
        s.check_response([], &bomb),
        Err(Leak::Bomb { place: "the body" })
    );
}

#[test]
fn a_compressed_stream_at_every_offset_is_refused_within_a_fixed_work() {
    // 3000 empty gzip members: a magic every ~20 bytes, and each member's
    // stream reads every member after it (quadratic: 16 s of CPU a check
    // in a release build before the ceiling).
    let s = scanner(&[KEY]);
    let body = gzip(b"").repeat(3000);
    assert!(body.len() < 64 * 1024, "{}", body.len());
    assert_eq!(
        s.check_response([], &body),
        Err(Leak::TooMany { place: "the body" })
    );
    // A few members are judged as before.
    let mut few = gzip(b"").repeat(10);
    few.extend(gzip(KEY.as_bytes()));
    assert!(found(s.check_response([], &few)));
    assert_eq!(s.check_response([], &gzip(b"").repeat(10)), Ok(()));
}

#[test]
fn a_text_full_of_two_byte_zlib_magics_is_judged_not_refused() {
    // `x^` (78 5e) reads as a zlib header: each start is charged what the
    // stream takes, not a decoder's read-ahead.
    let s = scanner(&[KEY]);
    let line = format!("f(x) = x^2 + 3x - 1 {}\n", "and so on ".repeat(20));
    let text = line.repeat(200);
    assert!(text.len() > 40 * 1024);
    assert_eq!(s.check_response([], text.as_bytes()), Ok(()));
}

#[test]
fn nesting_beyond_the_depth_is_refused() {
    let s = scanner(&[KEY]);
    let mut text = KEY.as_bytes().to_vec();
    for _ in 0..MAX_DEPTH + 1 {
        text = percent_all(&text).into_bytes();
    }
    assert_eq!(s.check(&text), Err(Leak::TooDeep { place: "a value" }));
    // Within the depth, found.
    let mut text = KEY.as_bytes().to_vec();
    for _ in 0..3 {
        text = STANDARD.encode(&text).into_bytes();
        text = percent_all(&text).into_bytes();
    }
    assert!(found(s.check(&text)));
}

#[test]
fn ordinary_responses_pass() {
    let s = scanner(&[KEY, "another secret with spaces 0123"]);
    for body in [
        &br#"{"id": 42, "name": "report-2024.pdf", "url": "https:\/\/example.com\/a%20b?x=1&amp;y=2", "note": "caf\u00e9"}"#[..],
        b"<html><body><p>Hello &amp; welcome &#8212; 50% off!</p></body></html>",
        b"id,name\n1,alice\n2,bob\n",
        b"sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        b"dGhpcyBpcyBqdXN0IGEgYmFzZTY0IGVuY29kZWQgc2VudGVuY2UgYWJvdXQgbm90aGluZw==",
        b"",
    ] {
        assert_eq!(s.check_response([], body), Ok(()), "{}", String::from_utf8_lossy(body));
    }
    assert!(LeakScanner::default().is_empty());
    assert_eq!(LeakScanner::default().check(KEY.as_bytes()), Ok(()));
}

#[test]
fn a_long_secret_is_sampled_at_a_stride() {
    let long: String = (0..20_000u32)
        .map(|i| {
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                    [(i.wrapping_mul(2654435761) >> 7) as usize % 62],
            )
        })
        .collect();
    let s = scanner(&[&long]);
    let w = window_len(long.len());
    let stride = (long.len() - w + 1).div_ceil(MAX_WINDOWS_PER_SECRET);
    // Any fragment of w + stride - 1 bytes is caught, wherever it starts.
    for start in (0..long.len() - w - stride).step_by(997) {
        let fragment = &long[start..start + w + stride - 1];
        assert!(found(s.check(fragment.as_bytes())), "{start}");
    }
}

#[test]
fn debug_shows_no_secret() {
    let debug = format!("{:?}", scanner(&[KEY]));
    assert!(!debug.contains(&KEY[..8]), "{debug}");
}

/// One encoding step of the property test; `None` where it does not apply
/// (a JSON or HTML escape of bytes that are not text).
fn encode_step(step: u8, column: usize, data: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(data).ok();
    Some(match step % 11 {
        0 => wrapped_base64(data, column.max(4)).into_bytes(),
        1 => URL_SAFE_NO_PAD.encode(data).into_bytes(),
        2 => hex_with(data, ":", true).into_bytes(),
        3 => hex_with(data, "", false).into_bytes(),
        4 => json_u(text?).into_bytes(),
        5 => serde_json::to_string(text?).ok()?.into_bytes(),
        6 => percent_all(data).into_bytes(),
        7 => html_numeric(text?).into_bytes(),
        8 => gzip(data),
        9 => zlib(data),
        _ => zstd(data),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any window of a secret, inside any text, through up to three
    /// supported encodings, inside any outer text, is caught.
    #[test]
    fn any_embedded_window_is_found(
        secret in "[A-Za-z0-9_+/=.-]{8,80}",
        start in any::<prop::sample::Index>(),
        prefix in "[ -~]{0,20}",
        suffix in "[ -~]{0,20}",
        steps in prop::collection::vec((any::<u8>(), 4usize..80), 0..=3),
        outer_prefix in "[a-zA-Z0-9 .,:{}\"]{0,12}",
        outer_suffix in "[a-zA-Z0-9 .,:{}\"]{0,12}",
    ) {
        let s = LeakScanner::new([secret.as_bytes()]).unwrap();
        let w = window_len(secret.len());
        let at = start.index(secret.len() - w + 1);
        let mut data = format!("{prefix}{}{suffix}", &secret[at..at + w]).into_bytes();
        let mut applied = Vec::new();
        for (step, column) in steps {
            if let Some(next) = encode_step(step, column, &data) {
                data = next;
                applied.push(step % 11);
            }
        }
        let body = [outer_prefix.as_bytes(), &data, outer_suffix.as_bytes()].concat();
        let result = s.check_response([], &body);
        prop_assert!(found(result.clone()), "{applied:?}: {result:?}");
    }

    /// Text that holds no window of the secret is not flagged.
    #[test]
    fn random_bodies_pass(
        secret in "[A-Za-z0-9]{32,64}",
        body in "[ -~\\n]{0,2000}",
        json in prop::collection::btree_map("[a-z]{1,8}", "[ -~]{0,40}", 0..20),
        binary in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        let s = LeakScanner::new([secret.as_bytes()]).unwrap();
        prop_assert_eq!(s.check_response([], body.as_bytes()), Ok(()));
        let json = serde_json::to_string(&json).unwrap();
        prop_assert_eq!(s.check_response([], json.as_bytes()), Ok(()));
        prop_assert_eq!(s.check_response([], &gzip(json.as_bytes())), Ok(()));
        prop_assert_eq!(s.check_response([], &binary), Ok(()));
    }
}

#[test]
fn an_error_message_is_judged_like_a_body() {
    let s = scanner(&[KEY]);
    let message = format!(
        "upstream request failed: STS refused (403): SignatureDoesNotMatch: {}",
        STANDARD.encode(format!("k{}", &KEY[..20]))
    );
    match s.check_message(&message) {
        Err(Leak::Found { place, trail }) => {
            assert_eq!(place, "an error message");
            assert_eq!(trail, ["base64"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.check_message("upstream request failed: connection refused"),
        Ok(())
    );
}
