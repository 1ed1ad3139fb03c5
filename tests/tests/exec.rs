// SPDX-License-Identifier: Apache-2.0
//! `kind = "exec"` against the real broker: the program is a shell script
//! that echoes its argv (one `<...>` line per element, after `argc=N`),
//! prints its credential, or sleeps.
//!
//! | attack | defence | test |
//! | --- | --- | --- |
//! | the program prints its credential env var (raw, base64, from its file) | output judged by the leak scanner, withheld whole | `credential_output_is_withheld` |
//! | `; rm -rf /`, `$(id)`, `` `id` ``, newline, spaces, `*` | one argv element, no shell | `values_are_one_inert_argv_element` |
//! | `--upload-pack=evil` as an option | a value starting with `-` refused unless after `--` | `dash_values_are_refused_unless_after_dashdash` |
//! | NUL, 1 MiB | refused by policy / the frame cap, never run | `nul_and_huge_values_never_run` |
//! | a child (and its children) that outlive the call | process group killed at the timeout and at exit | `timeout_kills_the_whole_group`, `leftover_children_die_with_the_call` |
//! | flooding the broker with output | stdout + stderr capped (`max_output_bytes`), the group killed | `output_over_the_cap_is_refused` |
//! | the broker's environment, privileges | clean environment, no_new_privs, credential file 0600 and removed | `child_environment_is_clean` |
//! | a token widened to other exec values | tokens pin exec parameters as http ones | `tokens_pin_exec_parameters` |
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_shim::client::Client;
use keyward_proto::Response;
use keyward_tests::{assert_no_secret, Broker, Ran, PRINCIPAL_UID, SECRET};

const ARGV: &str = r#"#!/bin/sh
printf 'argc=%s\n' "$#"
for a in "$@"; do printf '<%s>\n' "$a"; done
"#;

const PRINT_ENV: &str = "#!/bin/sh\nprintf 'token=%s\\n' \"$API_TOKEN\"\n";
const PRINT_ENV_B64: &str = "#!/bin/sh\nprintf '%s' \"$API_TOKEN\" | /usr/bin/base64\n";
const PRINT_FILE: &str = "#!/bin/sh\n/bin/cat \"$API_TOKEN_FILE\"\n";
const STAT_FILE: &str = "#!/bin/sh\nprintf '%s %s\\n' \"$API_TOKEN_FILE\" \"$(/usr/bin/stat -c %a \"$API_TOKEN_FILE\")\"\n";
const ENV: &str = "#!/bin/sh\nexport -p\n/bin/grep NoNewPrivs /proc/self/status\nfor f in /proc/self/fd/*; do /bin/readlink \"$f\"; done\ntrue\n";

/// Writes the pids of its group to `$1`, then sleeps with a sleeping child.
const SLEEPER: &str = r#"#!/bin/sh
/bin/sleep 300 &
printf '%s %s\n' "$$" "$!" > "$1"
/bin/sleep 300
"#;

/// A child holding the pipe, 5000 bytes on stdout, then waits.
const NOISY: &str = r#"#!/bin/sh
/bin/sleep 300 &
printf '%s %s\n' "$$" "$!" > "$1"
/usr/bin/head -c 5000 /dev/zero | /usr/bin/tr '\0' x
wait
"#;

/// Leaves a child behind (stdout closed) and exits at once.
const LEAVER: &str = r#"#!/bin/sh
/bin/sleep 300 >/dev/null 2>&1 &
printf '%s\n' "$!" > "$1"
echo done
"#;

struct Fixture {
    broker: Broker,
    scripts: tempfile::TempDir,
}

fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn fixture() -> Fixture {
    let scripts = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scripts.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = scripts.path();
    let argv = script(d, "argv.sh", ARGV);
    let print_env = script(d, "print_env.sh", PRINT_ENV);
    let print_env_b64 = script(d, "print_env_b64.sh", PRINT_ENV_B64);
    let print_file = script(d, "print_file.sh", PRINT_FILE);
    let stat_file = script(d, "stat_file.sh", STAT_FILE);
    let env = script(d, "env.sh", ENV);
    let sleeper = script(d, "sleeper.sh", SLEEPER);
    let leaver = script(d, "leaver.sh", LEAVER);
    let noisy = script(d, "noisy.sh", NOISY);
    let pids = d.join("pids");
    let config = format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
state_dir = "{{dir}}/state"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}, 0]
may_call = ["argv", "argv_dd", "print_env", "print_env_b64", "print_file", "stat_file", "env", "sleeper", "leaver", "noisy"]
may_delegate = ["argv"]

[credential.api]
file = "api.token"

[[tool]]
name = "argv"
kind = "exec"
program = "{argv}"
args = ["fixed", "{{value}}"]
params.value = {{ type = "string", max_len = 2000000 }}

[[tool]]
name = "argv_dd"
kind = "exec"
program = "{argv}"
args = ["ls-remote", "--", "{{value}}"]
params.value = {{ type = "string" }}

[[tool]]
name = "print_env"
kind = "exec"
credential = "api"
credential_env = "API_TOKEN"
program = "{print_env}"

[[tool]]
name = "print_env_b64"
kind = "exec"
credential = "api"
credential_env = "API_TOKEN"
program = "{print_env_b64}"

[[tool]]
name = "print_file"
kind = "exec"
credential = "api"
credential_file_env = "API_TOKEN_FILE"
program = "{print_file}"

[[tool]]
name = "stat_file"
kind = "exec"
credential = "api"
credential_file_env = "API_TOKEN_FILE"
program = "{stat_file}"

[[tool]]
name = "env"
kind = "exec"
program = "{env}"
env = {{ GIT_TERMINAL_PROMPT = "0" }}

[[tool]]
name = "sleeper"
kind = "exec"
program = "{sleeper}"
args = ["{pids}"]
timeout = "1s"

[[tool]]
name = "noisy"
kind = "exec"
program = "{noisy}"
args = ["{pids}"]
max_output_bytes = 1000
timeout = "30s"

[[tool]]
name = "leaver"
kind = "exec"
program = "{leaver}"
args = ["{pids}"]
"#,
        argv = argv.display(),
        print_env = print_env.display(),
        print_env_b64 = print_env_b64.display(),
        print_file = print_file.display(),
        stat_file = stat_file.display(),
        env = env.display(),
        sleeper = sleeper.display(),
        leaver = leaver.display(),
        noisy = noisy.display(),
        pids = pids.display(),
    );
    let broker = Broker::start(&config, &[("api.token", &format!("{SECRET}\n"))]);
    Fixture { broker, scripts }
}

impl Fixture {
    fn call(&self, args: &[&str]) -> Ran {
        self.broker.call(PRINCIPAL_UID, args)
    }

    /// The JSON reply of a successful call.
    fn reply(&self, args: &[&str]) -> serde_json::Value {
        let ran = self.call(args);
        assert_eq!(ran.code, Some(0), "{args:?}: {ran:?}");
        serde_json::from_str(&ran.stdout).unwrap()
    }

    fn argv_of(&self, tool: &str, value: &str) -> Vec<String> {
        let arg = format!("value={value}");
        let reply = self.reply(&[tool, &arg]);
        let stdout = reply["stdout"].as_str().unwrap();
        parse_argv(stdout)
    }

    fn pids(&self) -> Vec<i32> {
        let text = std::fs::read_to_string(self.scripts.path().join("pids")).unwrap();
        text.split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }
}

/// `argc=N` then N `<...>` elements (which may span lines).
fn parse_argv(stdout: &str) -> Vec<String> {
    let (first, rest) = stdout.split_once('\n').unwrap();
    let argc: usize = first.strip_prefix("argc=").unwrap().parse().unwrap();
    let mut args = Vec::new();
    let mut rest = rest;
    for _ in 0..argc {
        let body = rest.strip_prefix('<').unwrap();
        let end = body.find(">\n").unwrap();
        args.push(body[..end].to_owned());
        rest = &body[end + 2..];
    }
    assert!(rest.is_empty(), "more output than argc says: {rest:?}");
    args
}

/// Whether `pid` is still a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Every pid gone; waits a little for the kernel to finish the kill (not
/// a timing assertion: 10 s for what SIGKILL does at once).
fn assert_all_dead(pids: &[i32]) {
    let until = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in pids {
        assert!(!alive(pid), "process {pid} survived the call");
    }
}

#[test]
fn credential_output_is_withheld() {
    let f = fixture();
    for tool in ["print_env", "print_env_b64", "print_file"] {
        let ran = f.call(&[tool]);
        assert_ne!(ran.code, Some(0), "{tool}: {ran:?}");
        assert!(ran.stderr.contains("withheld"), "{tool}: {ran:?}");
        assert_no_secret("stdout", &ran.stdout);
        assert_no_secret("stderr", &ran.stderr);
    }
    assert_no_secret("audit", &f.broker.audit());
    // The same broker still runs a clean program.
    assert_eq!(f.argv_of("argv", "ok"), ["fixed", "ok"]);
    // Each call's outcome says what it came to, joined by its call id.
    let records = f.broker.audit_records();
    for (tool, withheld) in [
        ("print_env", true),
        ("print_env_b64", true),
        ("print_file", true),
        ("argv", false),
    ] {
        let allow = records
            .iter()
            .find(|r| r["event"] == "call" && r["decision"] == "allow" && r["tool"] == tool)
            .unwrap_or_else(|| panic!("{tool}: no allow"));
        let outcome = records
            .iter()
            .find(|r| r["event"] == "outcome" && r["call_id"] == allow["call_id"])
            .unwrap_or_else(|| panic!("{tool}: no outcome for {allow}"));
        assert_eq!(outcome["withheld"], withheld, "{outcome}");
        if !withheld {
            assert_eq!(outcome["status"], 200, "{outcome}");
        }
    }
}

#[test]
fn values_are_one_inert_argv_element() {
    let f = fixture();
    for value in [
        "; rm -rf /",
        "$(id)",
        "`id`",
        "a b\tc",
        "line1\nline2",
        "*",
        "' \" \\",
        "&& touch /tmp/keyward-pwned",
        "",
    ] {
        let argv = f.argv_of("argv", value);
        assert_eq!(argv, ["fixed", value], "value {value:?}");
    }
    assert!(!Path::new("/tmp/keyward-pwned").exists());
}

#[test]
fn dash_values_are_refused_unless_after_dashdash() {
    let f = fixture();
    for value in ["--upload-pack=evil", "-c", "-"] {
        let arg = format!("value={value}");
        let ran = f.call(&["argv", &arg]);
        assert_eq!(ran.code, Some(3), "{value}: {ran:?}");
        assert!(ran.stderr.contains("starts with \"-\""), "{ran:?}");
        // After a fixed `--` it is an operand, one element.
        assert_eq!(
            f.argv_of("argv_dd", value),
            ["ls-remote", "--", value],
            "{value}"
        );
    }
}

#[test]
fn nul_and_huge_values_never_run() {
    let f = fixture();
    let mut client = Client::connect(&f.broker.socket).unwrap();
    let nul = client
        .call("argv", &[("value".to_owned(), "a\0; id".to_owned())])
        .unwrap();
    match nul {
        Response::Denied(d) => assert!(d.reason.contains("NUL"), "{d:?}"),
        other => panic!("a NUL value ran: {other:?}"),
    }
    // 1 MiB: larger than a frame; the call never reaches the program.
    let huge = "A".repeat(1 << 20);
    let mut client = Client::connect(&f.broker.socket).unwrap();
    let result = client.call("argv", &[("value".to_owned(), huge)]);
    assert!(
        !matches!(result, Ok(Response::Done(_))),
        "a 1 MiB value ran: {result:?}"
    );
    // The broker still serves.
    assert_eq!(f.argv_of("argv", "ok"), ["fixed", "ok"]);
}

#[test]
fn timeout_kills_the_whole_group() {
    let f = fixture();
    let ran = f.call(&["sleeper"]);
    assert_ne!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stderr.contains("did not answer within"), "{ran:?}");
    let pids = f.pids();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_all_dead(&pids);
}

#[test]
fn leftover_children_die_with_the_call() {
    let f = fixture();
    let reply = f.reply(&["leaver"]);
    assert_eq!(reply["stdout"], "done\n");
    assert_eq!(reply["exit_code"], 0);
    assert_all_dead(&f.pids());
}

#[test]
fn child_environment_is_clean() {
    let f = fixture();
    let reply = f.reply(&["env"]);
    let out = reply["stdout"].as_str().unwrap();
    let exported: Vec<&str> = out.lines().filter(|l| l.starts_with("export ")).collect();
    // Only the tool's env (and what the shell sets itself).
    for line in &exported {
        assert!(
            line.starts_with("export GIT_TERMINAL_PROMPT=")
                || line.starts_with("export PWD=")
                || line.starts_with("export OLDPWD"),
            "inherited: {line}\n{out}"
        );
    }
    assert!(out.contains("GIT_TERMINAL_PROMPT='0'"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(!out.contains("socket:"), "a socket was inherited:\n{out}");
    // The shell's own 0, 1 and 2 (stdin /dev/null, two pipes), nothing else.
    let after = out.split("NoNewPrivs").nth(1).unwrap();
    let fds: Vec<&str> = after.lines().skip(1).collect();
    assert_eq!(fds.len(), 3, "inherited descriptors:\n{out}");
    assert_eq!(fds[0], "/dev/null", "{out}");

    // The credential file: 0600 during the call, gone after it.
    let reply = f.reply(&["stat_file"]);
    let out = reply["stdout"].as_str().unwrap().trim().to_owned();
    let (path, mode) = out.split_once(' ').unwrap();
    assert_eq!(mode, "600", "{out}");
    assert!(!Path::new(path).exists(), "{path} outlived the call");
}

#[test]
fn tokens_pin_exec_parameters() {
    let f = fixture();
    let ran = Ran::from(f.broker.shim(
        PRINCIPAL_UID,
        &["mint", "--tool", "argv", "--param", "value=hello"],
    ));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let token = ran.stdout.trim().to_owned();
    let with_token = |value: &str| {
        let arg = format!("value={value}");
        Ran::from(
            f.broker
                .shim(PRINCIPAL_UID, &["call", "--token", &token, "argv", &arg]),
        )
    };
    let ok = with_token("hello");
    assert_eq!(ok.code, Some(0), "{ok:?}");
    let reply: serde_json::Value = serde_json::from_str(&ok.stdout).unwrap();
    assert_eq!(
        parse_argv(reply["stdout"].as_str().unwrap()),
        ["fixed", "hello"]
    );
    for value in ["$(id)", "hello ", "hello; id"] {
        let ran = with_token(value);
        assert_eq!(ran.code, Some(3), "{value:?}: {ran:?}");
    }
}

#[test]
fn output_over_the_cap_is_refused() {
    let f = fixture();
    let ran = f.call(&["noisy"]);
    assert_ne!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stderr.contains("exceeds the 1000-byte limit"),
        "{ran:?}"
    );
    assert!(!ran.stdout.contains("xxxx"), "{ran:?}");
    // Refused as soon as the cap is passed: the group is killed then, not
    // at the 30 s timeout.
    assert_all_dead(&f.pids());
}
