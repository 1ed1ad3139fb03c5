// SPDX-License-Identifier: Apache-2.0
//! A hostile upstream against the real broker, in the encodings a second
//! review found the leak scanner missing: each route of [`Hostile`]
//! `/enc/NAME` serves the credential's debug document in one of them.
//! Each must end in "withheld: ..." with nothing of the body returned,
//! the outcome record saying withheld, and a legitimate call through the
//! same broker still working right after.
//!
//! | route | encoding |
//! | --- | --- |
//! | `/enc/utf16le` | UTF-16, little-endian, no BOM |
//! | `/enc/utf16be-bom` | UTF-16, big-endian, with a BOM |
//! | `/enc/dashes` | a `-` between every character |
//! | `/enc/base32` | RFC 4648 base32, unpadded |
//! | `/enc/raw-deflate` | deflate without a zlib or gzip header |
//! | `/enc/octal` | every byte a `\153` octal escape |
//! | `/enc/u-brace` | every character a `\u{6b}` escape |
//! | `/enc/quoted-printable` | every byte `=XX`, soft line breaks at 76 |
//! | `/enc/reversed` | the text reversed |
#![allow(clippy::unwrap_used)]

use keyward_tests::upstream::{Hostile, ENCODINGS};
use keyward_tests::{assert_no_secret, Broker, PRINCIPAL_UID, SECRET};

fn tool_name(encoding: &str) -> String {
    format!("enc_{}", encoding.replace('-', "_"))
}

fn config(port: u16) -> String {
    let mut tools = String::new();
    let mut names = vec!["\"ok\"".to_owned()];
    for encoding in ENCODINGS {
        let name = tool_name(encoding);
        tools.push_str(&format!(
            "[[tool]]\nname = \"{name}\"\nkind = \"http\"\ncredential = \"api\"\nmethod = \"GET\"\n\
             url = \"http://127.0.0.1:{port}/enc/{encoding}\"\nauth = {{ bearer = true }}\n\n"
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

{tools}"#,
        names = names.join(", ")
    )
}

#[test]
fn every_new_encoding_is_withheld() {
    let hostile = Hostile::start();
    let broker = Broker::start(
        &config(hostile.port),
        &[("api.token", &format!("{SECRET}\n"))],
    );
    let mut passed = Vec::new();
    for encoding in ENCODINGS {
        let tool = tool_name(encoding);
        let before = hostile.requests();
        let ran = broker.call(PRINCIPAL_UID, &["--json", &tool]);
        assert!(
            hostile.requests() > before,
            "{encoding}: never reached the upstream"
        );
        let withheld = ran.code == Some(1)
            && ran
                .stderr
                .contains("withheld: the response contains credential material");
        if !withheld {
            passed.push(format!("{encoding}: {ran:?}"));
            continue;
        }
        // `--json` prints the error object, and nothing of the body.
        let printed: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
        assert_eq!(printed.as_object().map(|o| o.len()), Some(1), "{ran:?}");
        let records = broker.audit_records();
        let allow = records
            .iter()
            .rev()
            .find(|r| {
                r["event"] == "call" && r["decision"] == "allow" && r["tool"] == tool.as_str()
            })
            .unwrap_or_else(|| panic!("{encoding}: no allow record"));
        let outcome = records
            .iter()
            .find(|r| r["event"] == "outcome" && r["call_id"] == allow["call_id"])
            .unwrap_or_else(|| panic!("{encoding}: no outcome for {allow}"));
        assert_eq!(outcome["withheld"], true, "{encoding}: {outcome}");
        for (what, text) in [("stdout", &ran.stdout), ("stderr", &ran.stderr)] {
            assert_no_secret(what, text);
        }
        // The legitimate call still works.
        let ok = broker.call(PRINCIPAL_UID, &["ok"]);
        assert_eq!(ok.code, Some(0), "{ok:?}");
        assert_eq!(ok.stdout, "legitimate");
    }
    assert!(
        passed.is_empty(),
        "returned, not withheld:\n{}",
        passed.join("\n")
    );
    let audit = broker.audit();
    assert_no_secret("audit", &audit);
    for start in 0..SECRET.len() - 9 {
        let window = &SECRET[start..start + 9];
        assert!(!audit.contains(window), "audit holds {window:?}");
    }
}
