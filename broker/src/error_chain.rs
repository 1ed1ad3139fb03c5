// SPDX-License-Identifier: Apache-2.0
//! One line of an error and its causes, for messages built from other
//! crates' errors (reqwest, tokio-postgres), which keep the useful part in
//! their sources. Not redacted: callers redact what may carry a credential.

/// An error and its causes, `: `-separated, each cause left out where the
/// message already says it.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
