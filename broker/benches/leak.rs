// SPDX-License-Identifier: Apache-2.0
//! Cost of the leak scanner: building it for a key, and judging a 60 KiB
//! response (the largest a tool may return) of several kinds, clean and
//! hostile. Prints one line per case: time per judgement and throughput.
//!
//! Run: `cargo bench -p keyward-broker --bench leak`.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::{Duration, Instant};

use base64::Engine as _;
use keyward_broker::leak::LeakScanner;

const KEY: &str = "kw_live_9fQ2xL7mZpR4tV1sB8nC3yH6";
const BODY: usize = 60 * 1024;

/// Median time of `f` over enough rounds to fill about a second.
fn time(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    f();
    let once = start.elapsed().max(Duration::from_micros(1));
    let rounds = (Duration::from_secs(1).as_nanos() / once.as_nanos()).clamp(5, 2_000) as usize;
    let mut samples: Vec<Duration> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn report(what: &str, bytes: usize, took: Duration) {
    let mbps = bytes as f64 / took.as_secs_f64() / 1e6;
    println!(
        "{what:<52} {:>10.1} µs {:>8.1} MB/s",
        took.as_secs_f64() * 1e6,
        mbps
    );
}

fn json_body() -> Vec<u8> {
    let mut out = String::from("[");
    let mut i = 0u64;
    while out.len() < BODY - 200 {
        out.push_str(&format!(
            r#"{{"id":{i},"name":"report-{i}.pdf","url":"https:\/\/example.com\/r\/{i}?a=1&amp;b=2","note":"caf\u00e9 ok","hash":"{:016x}"}},"#,
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ));
        i += 1;
    }
    out.push_str("{}]");
    out.into_bytes()
}

fn main() {
    let t = Instant::now();
    let scanner = LeakScanner::new([KEY.as_bytes()]).unwrap();
    println!(
        "build, one 32-byte key: {:.1} µs",
        t.elapsed().as_secs_f64() * 1e6
    );
    let pem: Vec<u8> = (0..4096u32)
        .map(|i| b'A' + (i.wrapping_mul(2_654_435_761) >> 13) as u8 % 26)
        .collect();
    let t = Instant::now();
    let _big = LeakScanner::new([KEY.as_bytes(), pem.as_slice()]).unwrap();
    println!(
        "build, + one 4 KiB key: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let json = json_body();
    let text: Vec<u8> = b"The quick brown fox jumps over the lazy dog. "
        .iter()
        .copied()
        .cycle()
        .take(BODY)
        .collect();
    let random: Vec<u8> = (0..BODY as u64)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(&random[..BODY * 3 / 4 - 3])
        .into_bytes();
    let hex: Vec<u8> = random[..BODY / 2]
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&json.repeat(8)).unwrap();
    let gz = gz.finish().unwrap();
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&vec![b'a'; 9 << 20]).unwrap();
    let bomb = bomb.finish().unwrap();
    let utf16: Vec<u8> = String::from_utf8_lossy(&json[..BODY / 2])
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    // A gzip magic every 20 bytes: each member a stream to the end.
    let mut member = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    member.write_all(b"").unwrap();
    let members = member.finish().unwrap().repeat(BODY / 20);
    let leak = {
        let mut body = json.clone();
        body.truncate(BODY - 100);
        body.extend_from_slice(format!("\"{}\"", &KEY[..24]).as_bytes());
        body
    };

    for (what, body) in [
        ("60 KiB JSON, clean", &json),
        ("60 KiB English text, clean", &text),
        ("60 KiB base64 of random bytes, clean", &b64),
        ("60 KiB hex of random bytes, clean", &hex),
        ("60 KiB random bytes, clean", &random),
        ("gzip of 480 KiB JSON (no Content-Encoding), clean", &gz),
        ("60 KiB JSON, a 24-byte quote at the end", &leak),
        ("gzip bomb (9 MiB of 'a'), refused at 4 MiB", &bomb),
        ("60 KiB UTF-16LE JSON, clean", &utf16),
        (
            "3000 empty gzip members, refused (too many streams)",
            &members,
        ),
    ] {
        let took = time(|| {
            let _ = std::hint::black_box(scanner.check_response([], body));
        });
        report(what, body.len(), took);
    }
}
