// SPDX-License-Identifier: Apache-2.0
//! Error texts are a channel like bodies: a hostile upstream that cannot
//! get the credential back in a response puts it in what the broker
//! quotes of its *refusal*. Each attack is performed for real by
//! [`Hostile`]; each must end in "withheld: ..." with nothing of the
//! smuggled text in what the caller sees or the audit, the outcome record
//! saying withheld, and a legitimate call still working.
//!
//! | attack | channel | test |
//! | --- | --- | --- |
//! | an STS endpoint refusing with a `<Message>` holding base64 of a fragment of the AWS secret | `upstream request failed: STS refused (403): ...` | `an_sts_error_message_carrying_the_secret_is_withheld` |
//! | a token endpoint refusing with an RFC 6749 error code that is the hex of a fragment of the client secret | `credential NAME: the token endpoint refused the request (...)` | `a_token_endpoint_error_code_carrying_the_secret_is_withheld` |
//!
//! Both are judged in one place: the executor runs the leak scanner over
//! every error a kind returns (`Executor::judge_error`).
#![allow(clippy::unwrap_used)]

use keyward_tests::upstream::{smuggled_base64, smuggled_hex, Hostile};
use keyward_tests::{assert_no_secret, Broker, Ran, PRINCIPAL_UID, SECRET};

fn config(port: u16) -> String {
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
state_dir = "{{dir}}/state"
call_timeout = "5s"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_call = ["ok", "sts", "oauth_call"]

[credential.api]
file = "api.token"

[credential.aws_admin]
kind = "aws"
access_key_id = "AKIAKEYWARDTEST00001"
secret_access_key_file = "aws.secret"
endpoint = "http://127.0.0.1:{port}/sts-error"
region = "us-east-1"

[credential.mail]
kind = "oauth2"
token_url = "http://127.0.0.1:{port}/oauth-error"
client_id = "keyward-test-client"
client_secret_file = "mail.client_secret"
refresh_token_file = "mail.refresh_token"

[[tool]]
name = "ok"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/ok"
auth = {{ bearer = true }}

[[tool]]
name = "sts"
kind = "aws_sts"
credential = "aws_admin"
role_arn = "arn:aws:iam::123456789012:role/agent-reader"
max_duration = "15m"

[[tool]]
name = "oauth_call"
kind = "http"
credential = "mail"
method = "GET"
url = "http://127.0.0.1:{port}/ok"
auth = {{ bearer = true }}
"#
    )
}

struct Fixture {
    hostile: Hostile,
    broker: Broker,
}

fn fixture() -> Fixture {
    let hostile = Hostile::start();
    let secret = format!("{SECRET}\n");
    let broker = Broker::start(
        &config(hostile.port),
        &[
            ("api.token", "kw-other-api-token-0123456789abcdef\n"),
            ("aws.secret", &secret),
            ("mail.client_secret", &secret),
            (
                "mail.refresh_token",
                "rt-keyward-refresh-token-9f8e7d6c5b4a\n",
            ),
        ],
    );
    Fixture { hostile, broker }
}

impl Fixture {
    fn call(&self, args: &[&str]) -> Ran {
        self.broker.call(PRINCIPAL_UID, args)
    }

    /// The call reached the hostile upstream, failed as withheld, and
    /// nothing of `smuggled` (nor any form of the secret) is in what the
    /// caller saw or the audit; the outcome record says withheld.
    fn assert_withheld(&self, tool: &str, smuggled: &str) {
        let before = self.hostile.requests();
        let ran = self.call(&[tool]);
        assert!(
            self.hostile.requests() > before,
            "{tool}: never reached the upstream"
        );
        assert_eq!(ran.code, Some(1), "{tool}: {ran:?}");
        assert!(
            ran.stderr
                .contains("withheld: the response contains credential material"),
            "{tool}: {ran:?}"
        );
        let audit = self.broker.audit();
        for (what, text) in [
            ("stdout", ran.stdout.as_str()),
            ("stderr", ran.stderr.as_str()),
            ("audit", audit.as_str()),
        ] {
            assert!(
                !text.contains(smuggled),
                "{tool}: {what} holds the smuggled text:\n{text}"
            );
            assert_no_secret(what, text);
        }
        let records = self.broker.audit_records();
        let allow = records
            .iter()
            .rev()
            .find(|r| r["event"] == "call" && r["decision"] == "allow" && r["tool"] == tool)
            .unwrap_or_else(|| panic!("{tool}: no allow record: {records:?}"));
        let outcome = records
            .iter()
            .find(|r| r["event"] == "outcome" && r["call_id"] == allow["call_id"])
            .unwrap_or_else(|| panic!("{tool}: no outcome for {allow}"));
        assert_eq!(outcome["withheld"], true, "{outcome}");
        assert!(
            outcome["reason"]
                .as_str()
                .is_some_and(|r| r.contains("withheld")),
            "{outcome}"
        );
        // A legitimate call through the same broker still works.
        let ran = self.call(&["ok"]);
        assert_eq!(ran.code, Some(0), "{ran:?}");
        assert_eq!(ran.stdout, "legitimate");
    }
}

#[test]
fn an_sts_error_message_carrying_the_secret_is_withheld() {
    fixture().assert_withheld("sts", &smuggled_base64());
}

#[test]
fn a_token_endpoint_error_code_carrying_the_secret_is_withheld() {
    fixture().assert_withheld("oauth_call", &smuggled_hex());
}
