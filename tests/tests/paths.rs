// SPDX-License-Identifier: Apache-2.0
//! Path escapes through a URL parameter, performed for real against a
//! hostile-normalising upstream: Python's stock `http.server`, which
//! percent-decodes the path and resolves `..` before it opens a file, so
//! `/public/..%2Fprivate%2Fadmin.txt` serves `private/admin.txt`.
//!
//! A `string` parameter in a URL path is one segment; a `path` parameter
//! is whole segments, none of them `.`, `..` or empty; a token's
//! `--prefix` on a path is judged on whole segments. Each attack is
//! refused by the real broker, and a legitimate call still works.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use keyward_tests::{Broker, Ran, PRINCIPAL_UID, STRANGER_UID};

/// The content an escape would read.
const ADMIN: &str = "ADMIN-ONLY-7f3a: the root password is in the safe";
const HELLO: &str = "hello from public";
const REPORT: &str = "quarterly report q1";
const REPORT_2024: &str = "quarterly report 2024 q2";
const EVIL_TWIN: &str = "reports-evil twin: not under reports/";

/// `python3 -m http.server` on 127.0.0.1 and an ephemeral port, serving
/// a temp dir with `public/` and `private/admin.txt`.
struct PythonServer {
    child: Child,
    port: u16,
    _root: tempfile::TempDir,
}

impl PythonServer {
    fn start() -> PythonServer {
        let root = tempfile::tempdir().unwrap();
        let put = |rel: &str, text: &str| {
            let path = root.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        put("public/hello.txt", HELLO);
        put("public/reports/q1.txt", REPORT);
        put("public/reports/2024/q2.txt", REPORT_2024);
        put("public/reports-evil/x.txt", EVIL_TWIN);
        put("private/admin.txt", ADMIN);
        let mut child = Command::new("python3")
            .args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1"])
            .arg("--directory")
            .arg(root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed for the path-escape tests");
        // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        PythonServer {
            child,
            port,
            _root: root,
        }
    }

    /// A raw GET of `target`, as sent on the wire: the body.
    fn get(&self, target: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "GET {target} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The upstream is as hostile as the issue says: an escape that reaches
/// it reads `private/admin.txt`. Without this, a refusal below would prove
/// nothing.
fn assert_upstream_normalises(server: &PythonServer) {
    let reply = server.get("/public/..%2Fprivate%2Fadmin.txt");
    assert!(reply.contains(ADMIN), "upstream did not escape: {reply}");
    let reply = server.get("/public/reports/../../private/admin.txt");
    assert!(reply.contains(ADMIN), "upstream did not escape: {reply}");
}

fn config(port: u16) -> String {
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
state_dir = "{{dir}}/state"
call_timeout = "5s"
max_token_ttl = "10m"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_call = ["public_file", "public_path"]
may_delegate = ["public_file", "public_path"]

# One segment: the file name under public/.
[[tool]]
name = "public_file"
kind = "http"
method = "GET"
url = "http://127.0.0.1:{port}/public/{{name}}"
params.name = {{ type = "string", max_len = 200 }}

# Whole segments: a relative path under public/.
[[tool]]
name = "public_path"
kind = "http"
method = "GET"
url = "http://127.0.0.1:{port}/public/{{name}}"
params.name = {{ type = "path", max_len = 200 }}
"#
    )
}

struct Fixture {
    server: PythonServer,
    broker: Broker,
}

fn fixture() -> Fixture {
    let server = PythonServer::start();
    assert_upstream_normalises(&server);
    let broker = Broker::start(&config(server.port), &[]);
    Fixture { server, broker }
}

impl Fixture {
    fn call(&self, uid: u32, args: &[&str]) -> Ran {
        self.broker.call(uid, args)
    }

    fn call_with(&self, uid: u32, token: &str, args: &[&str]) -> Ran {
        let mut full = vec!["call", "--token", token];
        full.extend_from_slice(args);
        Ran::from(self.broker.shim(uid, &full))
    }

    /// Mint as the orchestrator for the sub-agent; the token.
    fn mint(&self, args: &[&str]) -> String {
        let uid = STRANGER_UID.to_string();
        let mut full = vec!["mint", "--for-uid", &uid];
        full.extend_from_slice(args);
        let ran = Ran::from(self.broker.shim(PRINCIPAL_UID, &full));
        assert_eq!(ran.code, Some(0), "mint {args:?}: {ran:?}");
        ran.stdout.trim().to_owned()
    }
}

/// A denial: exit 3, one sentence naming the tool, the parameter and the
/// rule, and nothing from `private/`.
fn assert_refused(ran: &Ran, tool: &str, rule: &str) {
    assert_eq!(ran.code, Some(3), "expected a denial: {ran:?}");
    assert!(!ran.stdout.contains(ADMIN), "escaped: {ran:?}");
    let sentence = ran.stderr.trim();
    assert_eq!(sentence.lines().count(), 1, "one sentence: {ran:?}");
    for needle in [tool, "\"name\"", rule] {
        assert!(sentence.contains(needle), "no {needle:?} in: {ran:?}");
    }
}

fn assert_served(ran: &Ran, content: &str) {
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains(content), "{ran:?}");
}

/// Issue 9, row 6: `name=../private/admin.txt` into
/// `url = ".../public/{name}"`, and every encoding of the same escape.
#[test]
fn one_segment_parameter_cannot_leave_its_directory() {
    let f = fixture();
    let cases: &[(&str, &str)] = &[
        ("../private/admin.txt", "one URL path segment"),
        ("..%2Fprivate%2Fadmin.txt", "one URL path segment"),
        ("..%2fprivate%2fadmin.txt", "one URL path segment"),
        ("%2e%2e%2fprivate%2fadmin.txt", "one URL path segment"),
        ("%2E%2E/private/admin.txt", "one URL path segment"),
        ("..%252Fprivate%252Fadmin.txt", "one URL path segment"),
        ("..%u002fprivate%u002fadmin.txt", "one URL path segment"),
        ("..\\private\\admin.txt", "\"\\\""),
        ("..%5Cprivate%5Cadmin.txt", "\"\\\""),
        ("..%5cprivate%5cadmin.txt", "\"\\\""),
        ("..;/private/admin.txt", "one URL path segment"),
        ("..%C0%AFprivate%C0%AFadmin.txt", "not UTF-8"),
        ("..\u{FF0F}private\u{FF0F}admin.txt", "normalisation"),
        ("..", "\"..\""),
        ("%2e%2e", "\"..\""),
        (".%2E", "\"..\""),
        ("..;x", "\"..\""),
        (".", "\"..\""),
        ("", "empty"),
        ("..%00", "control character"),
    ];
    for (value, rule) in cases {
        let ran = f.call(PRINCIPAL_UID, &["public_file", &format!("name={value}")]);
        assert_refused(&ran, "public_file", rule);
    }
    // The legitimate call still works, and the upstream is still there.
    assert_served(
        &f.call(PRINCIPAL_UID, &["public_file", "name=hello.txt"]),
        HELLO,
    );
    assert!(f.server.get("/public/hello.txt").contains(HELLO));
}

/// A `path` parameter: whole segments, none of them a way up.
#[test]
fn path_parameter_cannot_leave_its_directory() {
    let f = fixture();
    let cases: &[(&str, &str)] = &[
        ("reports/../../private/admin.txt", "\".\" or \"..\" segment"),
        ("../private/admin.txt", "\".\" or \"..\" segment"),
        (
            "reports/./../../private/admin.txt",
            "\".\" or \"..\" segment",
        ),
        (
            "reports/%2e%2e/%2e%2e/private/admin.txt",
            "\".\" or \"..\" segment",
        ),
        (
            "reports/..;/..;/private/admin.txt",
            "\".\" or \"..\" segment",
        ),
        ("reports%2F..%2F..%2Fprivate%2Fadmin.txt", "encoded \"/\""),
        ("reports\\..\\..\\private\\admin.txt", "\"\\\""),
        ("/private/admin.txt", "empty"),
        ("reports//x", "empty"),
    ];
    for (value, rule) in cases {
        let ran = f.call(PRINCIPAL_UID, &["public_path", &format!("name={value}")]);
        assert_refused(&ran, "public_path", rule);
    }
    assert_served(
        &f.call(PRINCIPAL_UID, &["public_path", "name=reports/q1.txt"]),
        REPORT,
    );
}

/// Issue 9, row 7: a token limited by `--prefix name=reports/`, value
/// `reports/../../private/admin.txt`; and a prefix is whole segments.
#[test]
fn token_prefix_is_judged_on_whole_segments() {
    let f = fixture();
    let token = f.mint(&["--tool", "public_path", "--prefix", "name=reports/"]);
    let escape = "name=reports/../../private/admin.txt";
    let ran = f.call_with(STRANGER_UID, &token, &["public_path", escape]);
    assert_refused(&ran, "public_path", "\".\" or \"..\" segment");
    assert_served(
        &f.call_with(
            STRANGER_UID,
            &token,
            &["public_path", "name=reports/q1.txt"],
        ),
        REPORT,
    );

    // `reports` names a directory, not the start of a name.
    let bare = f.mint(&["--tool", "public_path", "--prefix", "name=reports"]);
    for token in [&token, &bare] {
        let ran = f.call_with(
            STRANGER_UID,
            token,
            &["public_path", "name=reports-evil/x.txt"],
        );
        assert_refused(&ran, "public_path", "prefix");
        assert!(!ran.stdout.contains(EVIL_TWIN), "{ran:?}");
    }
    assert_served(
        &f.call_with(STRANGER_UID, &bare, &["public_path", "name=reports/q1.txt"]),
        REPORT,
    );

    // On a one-segment parameter the prefix admits the value, and the
    // value is still one segment.
    let token = f.mint(&["--tool", "public_file", "--prefix", "name=reports/"]);
    let ran = f.call_with(STRANGER_UID, &token, &["public_file", escape]);
    assert_refused(&ran, "public_file", "one URL path segment");
    // A prefix on a one-segment parameter is judged on the value as sent:
    // the server decodes the segment back to exactly that value.
    let token = f.mint(&["--tool", "public_file", "--prefix", "name=hel"]);
    assert_served(
        &f.call_with(STRANGER_UID, &token, &["public_file", "name=hello.txt"]),
        HELLO,
    );
    for value in [
        "name=hel%2F..%2F..%2Fprivate%2Fadmin.txt",
        "name=hel/../../private/admin.txt",
    ] {
        let ran = f.call_with(STRANGER_UID, &token, &["public_file", value]);
        assert_refused(&ran, "public_file", "one URL path segment");
    }
}

/// Attenuating a path prefix narrows it by whole segments: `reports` to
/// `reports/2024`, never to `reportsx` (a sibling, not a subdirectory).
#[test]
fn attenuated_path_prefix_narrows_by_whole_segments() {
    let f = fixture();
    let parent = f.mint(&["--tool", "public_path", "--prefix", "name=reports"]);
    let attenuate = |prefix: &str| {
        let arg = format!("name={prefix}");
        Ran::from(f.broker.shim(
            STRANGER_UID,
            &["attenuate", "--token", &parent, "--prefix", &arg],
        ))
    };
    for sibling in ["reportsx", "reports-evil/", "report"] {
        let ran = attenuate(sibling);
        assert_eq!(ran.code, Some(3), "{sibling}: {ran:?}");
        assert!(ran.stderr.contains("wider than the token's"), "{ran:?}");
    }
    let ran = attenuate("reports/../private");
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("whole path segments"), "{ran:?}");

    let child = attenuate("reports/2024");
    assert_eq!(child.code, Some(0), "{child:?}");
    let child = child.stdout.trim().to_owned();
    assert_served(
        &f.call_with(
            STRANGER_UID,
            &child,
            &["public_path", "name=reports/2024/q2.txt"],
        ),
        REPORT_2024,
    );
    let ran = f.call_with(
        STRANGER_UID,
        &child,
        &["public_path", "name=reports/q1.txt"],
    );
    assert_refused(&ran, "public_path", "prefix \"reports/2024/\"");
}
