// SPDX-License-Identifier: Apache-2.0
//! What is valid in a configuration but probably not meant: reported by
//! `keyward-broker check` and at every start, never an error (a test setup
//! may mean it).
//!
//! - A tool that carries a credential to a plain `http://` URL sends the
//!   credential in clear text. `insecure_http = true` on the tool says it
//!   is meant (a loopback test upstream) and silences the warning.
//! - An `sql` tool whose `database` reaches a host that is not loopback
//!   without `sslmode=verify-full` sends its rows in clear, and a server
//!   impersonator may ask for the password in clear.

use crate::config::{Located, Source};
use crate::tool::sql;

/// Every warning about `src`, each located on the line of its entry.
pub fn config_warnings(src: &Source) -> Vec<Located> {
    let mut warnings = Vec::new();
    for entry in &src.config.tools {
        let tool = entry.get_ref();
        if tool.kind == "sql" {
            let database = tool.fields.get("database").and_then(|v| v.as_str());
            for host in database
                .map(sql::plaintext_remote_hosts)
                .unwrap_or_default()
            {
                warnings.push(src.error_at(
                    entry.span(),
                    format!("tool {:?}", tool.name),
                    format!(
                        "database: host {host:?} is reached without TLS: the rows cross the \
                         network in clear text and a server impersonator can ask for the \
                         password in clear; add ?sslmode=verify-full"
                    ),
                ));
            }
            continue;
        }
        if tool.credential.is_none() || tool.insecure_http {
            continue;
        }
        for (key, value) in &tool.fields {
            let Some(url) = value.as_str() else { continue };
            if !starts_with_ignore_case(url.trim_start(), "http://") {
                continue;
            }
            warnings.push(src.error_at(
                entry.span(),
                format!("tool {:?}", tool.name),
                format!(
                    "{key}: {url:?} is plain http: credential {:?} would cross the network \
                     in clear text; use https://, or set insecure_http = true on the tool \
                     for a loopback test upstream",
                    tool.credential.as_deref().unwrap_or_default()
                ),
            ));
        }
    }
    warnings
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TOOLS: &str = r#"[broker]
socket = "/tmp/k.sock"

[credential.api]
file = "api.token"

[[tool]]
name = "clear"
kind = "http"
credential = "api"
method = "GET"
url = "HTTP://api.example.com/v1"

[[tool]]
name = "tls"
kind = "http"
credential = "api"
method = "GET"
url = "https://api.example.com/v1"

[[tool]]
name = "public"
kind = "http"
method = "GET"
url = "http://example.com/"

[[tool]]
name = "loopback"
kind = "http"
credential = "api"
insecure_http = true
method = "GET"
url = "http://127.0.0.1:8080/"

[credential.db]
file = "db.password"

[[tool]]
name = "remote_clear"
kind = "sql"
credential = "db"
database = "postgresql://app@db.example.com/shop"
statement = "SELECT 1"

[[tool]]
name = "remote_tls"
kind = "sql"
credential = "db"
database = "postgresql://app@db.example.com/shop?sslmode=verify-full"
statement = "SELECT 1"

[[tool]]
name = "local_clear"
kind = "sql"
credential = "db"
database = "postgresql://app@127.0.0.1:5432/shop?sslmode=disable"
statement = "SELECT 1"

[[tool]]
name = "socket"
kind = "sql"
credential = "db"
database = "postgresql://app@%2Frun%2Fpostgresql/shop"
statement = "SELECT 1"
"#;

    #[test]
    fn warns_only_on_a_credential_over_plain_http_not_marked_insecure() {
        let src = Source::parse("b.toml", TOOLS.to_owned()).unwrap();
        let warnings = config_warnings(&src);
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        let text = warnings[0].to_string();
        assert!(
            text.starts_with("b.toml:7: tool \"clear\": url: "),
            "{text}"
        );
        assert!(text.contains("clear text"), "{text}");
        assert!(text.contains("insecure_http = true"), "{text}");
        // Of the sql tools, only the one reaching a remote host in clear.
        let sql = warnings[1].to_string();
        assert!(
            sql.contains("tool \"remote_clear\": database: host \"db.example.com\""),
            "{sql}"
        );
        assert!(sql.contains("sslmode=verify-full"), "{sql}");
    }
}
