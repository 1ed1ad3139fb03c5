// SPDX-License-Identifier: Apache-2.0
//! `keyward-broker status` and `keyward-broker tokens`: ask the running
//! broker over its socket (root or an admin uid) and print the answer as
//! text or JSON. Neither ever shows a credential value or a token string.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyward_proto::token::hex;
use keyward_proto::{Request, Response, StatusReport, TokenList};

use crate::config::Source;

/// How long the admin commands wait for the broker's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The socket: the one `config` names, else `$KEYWARD_SOCKET` or the
/// default.
fn socket(config: Option<&Path>) -> Result<PathBuf, String> {
    match config {
        Some(path) => Source::load(path)
            .map(|source| keyward_client::socket_path_or(source.config.broker.socket))
            .map_err(|e| e.to_string()),
        None => Ok(keyward_client::socket_path()),
    }
}

/// One request to the broker; a denial exits 3, any other failure 1.
fn ask(config: Option<&Path>, request: &Request) -> Result<Response, ExitCode> {
    let fail = |message: String| {
        eprintln!("keyward-broker: {message}");
        ExitCode::FAILURE
    };
    let socket = socket(config).map_err(fail)?;
    let reply = keyward_client::Client::connect_within(&socket, keyward_client::CONNECT_TIMEOUT)
        .and_then(|mut client| {
            client.set_reply_timeout(REPLY_TIMEOUT)?;
            client.request(request)
        });
    match reply {
        Ok(Response::Denied(d)) => {
            eprintln!("keyward-broker: {}", d.reason);
            Err(ExitCode::from(3))
        }
        Ok(Response::Error(e)) if e.code == keyward_proto::ErrorCode::Malformed => {
            Err(fail(format!(
                "the broker does not understand this request ({}); is it an older version?",
                e.message
            )))
        }
        Ok(Response::Error(e)) => Err(fail(format!("broker error ({:?}): {}", e.code, e.message))),
        Ok(response) => Ok(response),
        Err(e) => Err(fail(format!("{}: {e}", socket.display()))),
    }
}

/// `keyward-broker status [--json]`.
pub fn run_status(config: Option<&Path>, json: bool) -> ExitCode {
    match ask(config, &Request::Status) {
        Ok(Response::Status(report)) => {
            if json {
                println!("{}", status_json(&report));
            } else {
                print!("{}", status_text(&report));
            }
            ExitCode::SUCCESS
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}

/// `keyward-broker tokens [--json]`.
pub fn run_tokens(config: Option<&Path>, json: bool) -> ExitCode {
    match ask(config, &Request::Tokens) {
        Ok(Response::TokenList(list)) => {
            let now = unix_now();
            if json {
                println!("{}", tokens_json(&list, now));
            } else {
                print!("{}", tokens_text(&list, now));
            }
            ExitCode::SUCCESS
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}

fn unexpected(response: &Response) -> ExitCode {
    eprintln!("keyward-broker: unexpected reply from the broker: {response:?}");
    ExitCode::FAILURE
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix seconds as an ISO 8601 UTC time.
pub fn iso_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// `in 4m 12s`, or `4m 12s ago`, from `now`.
pub fn relative(at: u64, now: u64) -> String {
    if at >= now {
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(at - now))
        )
    } else {
        format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(now - at))
        )
    }
}

fn status_text(r: &StatusReport) -> String {
    let now = r.started_at.saturating_add(r.uptime_secs);
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<14} {v}\n"));
    line("version", r.version.clone());
    line(
        "uptime",
        format!(
            "since {} ({})",
            iso_time(r.started_at),
            humantime::format_duration(Duration::from_secs(r.uptime_secs))
        ),
    );
    line("config", r.config.clone());
    line("socket", r.socket.clone());
    line(
        "policy",
        format!(
            "loaded {} ({}), blake3 {}",
            iso_time(r.policy_loaded_at),
            relative(r.policy_loaded_at, now),
            hex(&r.policy_hash)
        ),
    );
    let sessions: u64 = r.sessions.iter().map(|s| s.sessions).sum();
    let by_uid: Vec<String> = r
        .sessions
        .iter()
        .map(|s| format!("uid {}: {}", s.uid, s.sessions))
        .collect();
    line(
        "sessions",
        if by_uid.is_empty() {
            "0".to_owned()
        } else {
            format!("{sessions} ({})", by_uid.join(", "))
        },
    );
    line(
        "tokens",
        match r.live_tokens {
            Some(n) => format!("{n} live"),
            None => "disabled (no state directory)".to_owned(),
        },
    );
    line(
        "calls",
        format!(
            "{} allowed, {} denied, {} failed; {} refused",
            r.calls_allowed, r.calls_denied, r.calls_failed, r.refused
        ),
    );
    if r.credentials.is_empty() {
        line("credentials", "none".to_owned());
    }
    for (i, c) in r.credentials.iter().enumerate() {
        let key = if i == 0 { "credentials" } else { "" };
        line(key, format!("{}: {}", c.name, c.state));
    }
    out
}

fn status_json(r: &StatusReport) -> serde_json::Value {
    serde_json::json!({
        "version": r.version,
        "started_at": iso_time(r.started_at),
        "uptime_secs": r.uptime_secs,
        "config": r.config,
        "socket": r.socket,
        "policy": {
            "loaded_at": iso_time(r.policy_loaded_at),
            "blake3": hex(&r.policy_hash),
        },
        "sessions": r.sessions.iter().map(|s| serde_json::json!({
            "uid": s.uid, "sessions": s.sessions,
        })).collect::<Vec<_>>(),
        "live_tokens": r.live_tokens,
        "credentials": r.credentials.iter().map(|c| serde_json::json!({
            "name": c.name, "state": c.state,
        })).collect::<Vec<_>>(),
        "calls": {
            "allowed": r.calls_allowed,
            "denied": r.calls_denied,
            "failed": r.calls_failed,
            "refused": r.refused,
        },
    })
}

fn tokens_text(list: &TokenList, now: u64) -> String {
    let mut out = format!(
        "{:<32}  {:<16} {:<10} {:<16} {:<9} {:<28} STATE\n",
        "ID", "ISSUER", "AUDIENCE", "TASK", "USES", "EXPIRES"
    );
    for t in &list.tokens {
        let audience = t.audience.map_or("?".to_owned(), |a| match a.gid {
            Some(gid) => format!("{}:{gid}", a.uid),
            None => a.uid.to_string(),
        });
        let task = t.task.map_or("?".to_owned(), |h| hex(&h[..8]));
        let uses = match t.max_uses {
            Some(max) => format!("{}/{max}", t.uses),
            None => t.uses.to_string(),
        };
        let state = match (t.revoked, t.parent) {
            (true, _) => "revoked".to_owned(),
            (false, Some(parent)) => format!("child of {parent}"),
            (false, None) => "live".to_owned(),
        };
        out.push_str(&format!(
            "{:<32}  {:<16} {:<10} {:<16} {:<9} {:<28} {state}\n",
            t.id.to_string(),
            t.issuer,
            audience,
            task,
            uses,
            format!("{} ({})", iso_time(t.expires), relative(t.expires, now)),
        ));
    }
    out
}

fn tokens_json(list: &TokenList, now: u64) -> serde_json::Value {
    serde_json::Value::Array(
        list.tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "id": t.id.to_string(),
                    "issuer": t.issuer,
                    "owner_uid": t.owner,
                    "audience": t.audience.map(|a| serde_json::json!({"uid": a.uid, "gid": a.gid})),
                    "task": t.task.map(|h| hex(&h)),
                    "parent": t.parent.map(|p| p.to_string()),
                    "uses": t.uses,
                    "max_uses": t.max_uses,
                    "expires": iso_time(t.expires),
                    "expires_in_secs": t.expires.saturating_sub(now),
                    "revoked": t.revoked,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_iso_and_as_a_distance() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(relative(1252, 1000), "in 4m 12s");
        assert_eq!(relative(1000, 1060), "1m ago");
    }
}
