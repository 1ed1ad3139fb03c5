// SPDX-License-Identifier: Apache-2.0
//! A hostile upstream against the real broker: every way issue 9 found to
//! get the credential back through a response, performed for real by
//! [`Hostile`]. Each must end in "withheld: ..." with nothing of the body
//! returned, an audit record saying so, and a legitimate call through the
//! same broker still working right after.
//!
//! | route | leak |
//! | --- | --- |
//! | `/two-encodings` | `Content-Encoding: identity`, then `Content-Encoding: gzip`, gzip body |
//! | `/gzip-bare` | a gzip body with no `Content-Encoding` |
//! | `/base64-wrapped` | base64 wrapped at 76 columns, the secret across a line break |
//! | `/base64-narrow` | base64 wrapped at 8 columns: no line holds a window |
//! | `/split-headers` | the secret in halves over two `X-Part` headers |
//! | `/split-headers-short` | a 16-byte fragment in two 8-byte `X-Part` headers (each under the window) |
//! | `/json-u` | JSON with every character `\u`-escaped |
//! | `/json-in-json` | a JSON document inside a JSON string, the secret `\u`-escaped inside |
//! | `/hex-colons` | hex with `:` separators |
//! | `/partial-401` | a 401 quoting all but the last 2 characters of the key |
#![allow(clippy::unwrap_used)]

use keyward_tests::upstream::Hostile;
use keyward_tests::{assert_no_secret, Broker, Ran, PRINCIPAL_UID, SECRET};

const ROUTES: &[&str] = &[
    "two-encodings",
    "gzip-bare",
    "base64-wrapped",
    "base64-narrow",
    "split-headers",
    "split-headers-short",
    "json-u",
    "json-in-json",
    "hex-colons",
    "partial-401",
];

fn tool_name(route: &str) -> String {
    route.replace('-', "_")
}

fn config(port: u16) -> String {
    let mut tools = String::new();
    let mut names = vec![
        "\"ok\"".to_owned(),
        "\"send\"".to_owned(),
        "\"echo\"".to_owned(),
    ];
    for route in ROUTES {
        let name = tool_name(route);
        tools.push_str(&format!(
            "[[tool]]\nname = \"{name}\"\nkind = \"http\"\ncredential = \"api\"\nmethod = \"GET\"\n\
             url = \"http://127.0.0.1:{port}/{route}\"\nauth = {{ bearer = true }}\n\n"
        ));
        names.push(format!("\"{name}\""));
    }
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
call_timeout = "5s"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_call = [{names}]

[credential.api]
file = "api.token"

[[tool]]
name = "ok"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/ok"
auth = {{ bearer = true }}

[[tool]]
name = "send"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/ok?q={{q}}"
auth = {{ bearer = true }}
params.q = {{ type = "string", max_len = 500 }}

[[tool]]
name = "echo"
kind = "echo"
params.message = {{ type = "string", max_len = 500 }}

{tools}"#,
        names = names.join(", ")
    )
}

struct Fixture {
    hostile: Hostile,
    broker: Broker,
}

fn fixture() -> Fixture {
    let hostile = Hostile::start();
    let broker = Broker::start(
        &config(hostile.port),
        &[("api.token", &format!("{SECRET}\n"))],
    );
    Fixture { hostile, broker }
}

impl Fixture {
    fn call(&self, args: &[&str]) -> Ran {
        self.broker.call(PRINCIPAL_UID, args)
    }

    /// No form of the secret, and no window of it, in anything the caller
    /// saw or the broker logged.
    fn assert_clean(&self, ran: &Ran) {
        for (what, text) in [
            ("stdout", ran.stdout.as_str()),
            ("stderr", ran.stderr.as_str()),
            ("audit", &self.broker.audit()),
        ] {
            assert_no_secret(what, text);
            for start in 0..SECRET.len() - 9 {
                let window = &SECRET[start..start + 9];
                assert!(!text.contains(window), "{what} holds {window:?}:\n{text}");
            }
        }
    }

    /// The legitimate call through the same broker still works.
    fn assert_still_serving(&self) {
        let ran = self.call(&["ok"]);
        assert_eq!(ran.code, Some(0), "{ran:?}");
        assert_eq!(ran.stdout, "legitimate");
    }

    fn assert_withheld(&self, route: &str) {
        let tool = tool_name(route);
        let before = self.hostile.requests();
        let ran = self.call(&["--json", &tool]);
        assert!(
            self.hostile.requests() > before,
            "{route}: never reached the upstream"
        );
        assert_eq!(ran.code, Some(1), "{route}: {ran:?}");
        // `--json` prints the error object, and nothing of the body.
        let printed: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
        assert_eq!(
            printed.as_object().map(|o| o.len()),
            Some(1),
            "{route}: a body came back: {ran:?}"
        );
        assert!(printed["error"]["message"].is_string(), "{route}: {ran:?}");
        let expected = if route == "two-encodings" {
            "compressed (content-encoding)"
        } else {
            "withheld: the response"
        };
        assert!(ran.stderr.contains(expected), "{route}: {ran:?}");
        self.assert_clean(&ran);
        let records = self.broker.audit_records();
        let record = records
            .iter()
            .rev()
            .find(|r| r["tool"] == tool.as_str() && r["event"] == "call_failed")
            .unwrap_or_else(|| panic!("{route}: no call_failed record: {records:?}"));
        let reason = record["reason"].as_str().unwrap();
        assert!(reason.contains(expected), "{route}: {record}");
        // The outcome record says so.
        let allow = records
            .iter()
            .rev()
            .find(|r| {
                r["tool"] == tool.as_str() && r["event"] == "call" && r["decision"] == "allow"
            })
            .unwrap_or_else(|| panic!("{route}: no allow record"));
        let outcome = records
            .iter()
            .find(|r| r["event"] == "outcome" && r["call_id"] == allow["call_id"])
            .unwrap_or_else(|| panic!("{route}: no outcome for {allow}"));
        assert_eq!(
            outcome["withheld"],
            expected.starts_with("withheld"),
            "{route}: {outcome}"
        );
        self.assert_still_serving();
    }
}

#[test]
fn two_content_encoding_headers() {
    fixture().assert_withheld("two-encodings");
}

#[test]
fn gzip_body_without_content_encoding() {
    fixture().assert_withheld("gzip-bare");
}

#[test]
fn base64_wrapped_across_a_line_break() {
    let f = fixture();
    f.assert_withheld("base64-wrapped");
    f.assert_withheld("base64-narrow");
}

#[test]
fn secret_split_over_two_same_name_headers() {
    let f = fixture();
    f.assert_withheld("split-headers");
    f.assert_withheld("split-headers-short");
}

#[test]
fn json_with_every_character_unicode_escaped() {
    fixture().assert_withheld("json-u");
}

#[test]
fn json_inside_json() {
    fixture().assert_withheld("json-in-json");
}

#[test]
fn hex_with_colon_separators() {
    fixture().assert_withheld("hex-colons");
}

#[test]
fn a_401_quoting_all_but_the_last_two_characters() {
    fixture().assert_withheld("partial-401");
}

/// A parameter carrying credential material is denied before anything is
/// sent: the secret cannot be smuggled out through the upstream, or
/// reflected back by it or by the echo tool.
#[test]
fn a_parameter_carrying_credential_material_is_denied() {
    use base64::Engine as _;
    let f = fixture();
    let hex: String = SECRET[4..24].bytes().map(|b| format!("{b:02X}")).collect();
    for (tool, param, value) in [
        ("send", "q", format!("x{}", &SECRET[3..20])),
        (
            "send",
            "q",
            base64::engine::general_purpose::STANDARD.encode(&SECRET[..20]),
        ),
        ("echo", "message", hex),
    ] {
        let before = f.hostile.requests();
        let arg = format!("{param}={value}");
        let ran = f.call(&[tool, &arg]);
        assert_eq!(ran.code, Some(3), "{tool}: {ran:?}");
        assert!(
            ran.stderr.contains(&format!(
                "parameter \"{param}\" of tool {tool} carries credential material"
            )),
            "{ran:?}"
        );
        assert!(ran.stdout.is_empty(), "{ran:?}");
        assert_eq!(f.hostile.requests(), before, "{tool}: the call was sent");
        assert!(f
            .broker
            .audit_records()
            .iter()
            .any(|r| r["decision"] == "deny"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("carries credential material"))));
    }
    // An ordinary value goes through.
    let ran = f.call(&["send", "q=quarterly-report"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    f.assert_still_serving();
}
