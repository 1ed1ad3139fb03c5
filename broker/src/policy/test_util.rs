// SPDX-License-Identifier: Apache-2.0
//! Fixtures for the policy tests: a test policy, parsing and calls.
#![allow(clippy::expect_used)]

use keyward_proto::{Call, Param, Value};

use crate::config::{Located, Source};

use super::Policy;

pub(crate) const BROKER: &str = "[broker]\nsocket = \"/tmp/k.sock\"\n";

/// A policy with echo tools only (the http compiler is tested in its
/// own module).
pub(crate) const POLICY: &str = r#"[broker]
socket = "/tmp/k.sock"

[[principal]]
name = "orchestrator"
uids = [1000]
may_call = ["mail", "count", "flags"]

[[principal]]
name = "ops"
gids = [50]
may_call = ["count"]

[[principal]]
name = "nobody-special"
uids = [2000]

[[tool]]
name = "mail"
kind = "echo"
params.to = { type = "string", pattern = '[a-z0-9._-]+@example\.com' }
params.subject = { type = "string", max_len = 10, default = "hi" }
params.key = { type = "string", prefix = "sk-", secret = true }
params.kind = { type = "string", one_of = ["plain", "html"], default = "plain" }

[[tool]]
name = "count"
kind = "echo"
params.n = { type = "int", min = -5, max = 100 }
params.unit = { type = "int", one_of = [1, 10], default = 1 }

[[tool]]
name = "flags"
kind = "echo"
params.on = { type = "bool", default = false }
params.code = { type = "string", one_of = ["a1", "b2"], secret = true, default = "a1" }

[[tool]]
name = "unlisted"
kind = "echo"
"#;

pub(crate) fn source(text: &str) -> Source {
    Source::parse("t.toml", text.to_owned()).expect("test config parses")
}

pub(crate) fn policy() -> Policy {
    Policy::compile(&source(POLICY)).expect("test policy compiles")
}

pub(crate) fn errors(text: &str) -> Vec<Located> {
    match Policy::compile(&source(text)) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e,
    }
}

/// The single error of a config, as `line: entry: message`.
pub(crate) fn one_error(text: &str) -> Located {
    let mut errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.remove(0)
}

pub(crate) fn call(tool: &str, params: &[(&str, Value)]) -> Call {
    Call {
        tool: tool.to_owned(),
        params: params
            .iter()
            .map(|(name, value)| Param {
                name: (*name).to_owned(),
                value: value.clone(),
            })
            .collect(),
    }
}

pub(crate) fn s(v: &str) -> Value {
    Value::Str(v.to_owned())
}
