// SPDX-License-Identifier: Apache-2.0
//! Fuzz properties of the broker's leak scanner (`keyward_broker::leak`),
//! which judges what an upstream sends back before a caller sees it.
//!
//! One source for both runners: the cargo-fuzz target
//! `fuzz/fuzz_targets/leak_scan.rs` and the bounded run in
//! `broker/tests/fuzz.rs` include this file with `#[path]`. Only public
//! APIs are used.

use std::io::Write;

use base64::Engine;
use keyward_broker::leak::{window_len, LeakScanner};

/// The credential the scanner guards: 32 characters, like an API key, so
/// its window is 8 bytes.
pub const SECRET: &[u8] = b"kw_test_Zq8mN3vR7tY2pL5xW9cB4hJ6";

/// The scanner for [`SECRET`], built once (building it is most of the
/// cost of a case).
pub fn scanner() -> &'static LeakScanner {
    static SCANNER: std::sync::OnceLock<LeakScanner> = std::sync::OnceLock::new();
    SCANNER.get_or_init(|| LeakScanner::new([SECRET]).expect("a 32-byte secret makes a scanner"))
}

/// How a hostile upstream dresses what it returns.
const ENCODINGS: usize = 8;

fn encode(how: usize, text: &[u8]) -> Vec<u8> {
    match how % ENCODINGS {
        0 => text.to_vec(),
        1 => base64::engine::general_purpose::STANDARD
            .encode(text)
            .into_bytes(),
        2 => {
            // Wrapped at 76 columns, as MIME does.
            let flat = base64::engine::general_purpose::STANDARD.encode(text);
            let lines: Vec<&str> = flat
                .as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
                .collect();
            lines.join("\r\n").into_bytes()
        }
        3 => text
            .iter()
            .map(|b| format!("{b:02x}:"))
            .collect::<String>()
            .into_bytes(),
        4 => text
            .iter()
            .map(|b| format!("%{b:02X}"))
            .collect::<String>()
            .into_bytes(),
        5 => {
            let escaped: String = text.iter().map(|b| format!("\\u{:04x}", b)).collect();
            format!("{{\"data\":\"{escaped}\"}}").into_bytes()
        }
        6 => text
            .iter()
            .map(|b| format!("&#{b};"))
            .collect::<String>()
            .into_bytes(),
        _ => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(text).expect("writing to a Vec cannot fail");
            gz.finish().expect("writing to a Vec cannot fail")
        }
    }
}

/// Any body and headers: judging never panics. And a window of the
/// secret put anywhere into the body, then dressed in any encoding the
/// scanner claims to see through, is always refused.
///
/// Input: byte 0 picks the encoding, byte 1 the window of the secret,
/// byte 2 where it goes; the rest is the body around it.
pub fn leak_scan(data: &[u8]) {
    let scanner = scanner();
    let _ = scanner.check_response([(&b"x-data"[..], data)], data);
    let _ = scanner.check(data);

    let [how, which, at, rest @ ..] = data else {
        return;
    };
    let w = window_len(SECRET.len());
    let start = usize::from(*which) % (SECRET.len() - w + 1);
    let window = &SECRET[start..start + w];
    let at = usize::from(*at) % (rest.len() + 1);
    let mut body = rest[..at].to_vec();
    body.extend_from_slice(window);
    body.extend_from_slice(&rest[at..]);
    let dressed = encode(usize::from(*how), &body);
    assert!(
        scanner.check_response([], &dressed).is_err(),
        "a window of the secret got through, encoding {}",
        usize::from(*how) % ENCODINGS
    );
}
