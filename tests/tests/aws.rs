// SPDX-License-Identifier: Apache-2.0
//! AWS credentials against `moto` in server mode (PyPI, from the test
//! venv) with IAM enforcement on, and the real `aws` CLI (awscli) as the
//! client: the proxied, SigV4-signed tool reads the one object its token
//! pins and no other; derived (STS) credentials reach the sandboxed
//! program's environment only, read the object, cannot read a sibling
//! (the broker's session policy) or write (the role), live no longer than
//! the token and are named after it; the admin secret appears nowhere.
//!
//! moto evaluates no session policy on its own (5.x): `tests/aws/
//! moto_server.py` adds AWS's rule (role policy AND session policy) with
//! moto's own evaluator; `tests/aws/setup.py` creates the IAM user, role,
//! bucket and objects, then turns IAM enforcement on.
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keyward_tests::{
    leaked_forms, shim_command, test_venv, venv_python, Broker, Ran, PRINCIPAL_UID,
};

/// moto on a loopback port, set up, with IAM enforcement on.
struct Moto {
    child: Child,
    endpoint: String,
    venv: PathBuf,
    admin_key_id: String,
    admin_secret: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_moto() -> Option<Moto> {
    let venv = test_venv()?;
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("aws");
    let port = free_port();
    let mut child = Command::new(venv.join("bin/python"))
        .arg(scripts.join("moto_server.py"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // No authentication while setup.py creates the IAM entities (a
        // count moto never reaches); setup.py then resets it to 0.
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "1000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("moto exited: {status}");
        }
        assert!(Instant::now() < deadline, "moto did not listen within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let endpoint = format!("http://127.0.0.1:{port}");
    let setup = Command::new(venv.join("bin/python"))
        .arg(scripts.join("setup.py"))
        .arg(&endpoint)
        .output()
        .unwrap();
    let ran = Ran::from(setup);
    assert_eq!(ran.code, Some(0), "setup.py: {ran:?}");
    let keys: serde_json::Value = serde_json::from_str(ran.stdout.trim()).unwrap();
    Some(Moto {
        child,
        endpoint,
        venv,
        admin_key_id: keys["access_key_id"].as_str().unwrap().to_owned(),
        admin_secret: keys["secret_access_key"].as_str().unwrap().to_owned(),
    })
}

const POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::project-bucket/analysis/{key}"}]}"#;

fn config(moto: &Moto, session_policy: bool) -> String {
    let endpoint = &moto.endpoint;
    let key_id = &moto.admin_key_id;
    let policy = if session_policy {
        format!("session_policy = '''{POLICY}'''")
    } else {
        String::new()
    };
    format!(
        r#"[broker]
socket = "{{socket}}"
socket_mode = "0666"
state_dir = "{{dir}}/state"
credentials_dir = "{{dir}}/creds"
max_token_ttl = "1h"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_delegate = ["read_analysis", "s3_read_credentials", "s3_loose", "s3_federated"]

[credential.aws_admin]
kind = "aws"
access_key_id = "{key_id}"
secret_access_key_file = "aws.secret"
endpoint = "{endpoint}"
region = "us-east-1"

[[tool]]
name = "read_analysis"
kind = "http"
credential = "aws_admin"
method = "GET"
url = "{endpoint}/project-bucket/analysis/{{key}}"
auth = {{ aws_sigv4 = {{ service = "s3", region = "us-east-1" }} }}
params.key = {{ type = "string", pattern = '^[A-Za-z0-9._-]{{1,128}}$' }}

[[tool]]
name = "s3_read_credentials"
kind = "aws_sts"
credential = "aws_admin"
role_arn = "arn:aws:iam::123456789012:role/agent-reader"
{policy}
max_duration = "15m"
params.key = {{ type = "string", pattern = '^[A-Za-z0-9._-]{{1,128}}$' }}

# The same with a parameter any string passes: only the broker's refusal
# of IAM wildcards keeps a token pinned to a pattern from widening.
[[tool]]
name = "s3_loose"
kind = "aws_sts"
credential = "aws_admin"
role_arn = "arn:aws:iam::123456789012:role/agent-reader"
session_policy = '''{POLICY}'''
params.key = {{ type = "string", max_len = 128 }}

[[tool]]
name = "s3_federated"
kind = "aws_sts"
credential = "aws_admin"
session_policy = '''{POLICY}'''
max_duration = "1h"
params.key = {{ type = "string", pattern = '^[A-Za-z0-9._-]{{1,128}}$' }}
"#
    )
}

fn start_broker(moto: &Moto, session_policy: bool) -> Broker {
    Broker::start(
        &config(moto, session_policy),
        &[("aws.secret", &format!("{}\n", moto.admin_secret))],
    )
}

/// `agent-shim mint ARGS` as the orchestrator: (token, id, expires).
fn mint(broker: &Broker, args: &[&str]) -> (String, String, u64) {
    let mut full = vec!["mint"];
    full.extend_from_slice(args);
    let ran = Ran::from(broker.shim(PRINCIPAL_UID, &full));
    assert_eq!(ran.code, Some(0), "mint: {ran:?}");
    // "agent-shim: token ID expires at N (unix time)"
    let words: Vec<&str> = ran.stderr.split_whitespace().collect();
    let at = |w: &str| words.iter().position(|x| *x == w).unwrap();
    let id = words[at("token") + 1].to_owned();
    let expires = words[at("at") + 1].parse().unwrap();
    (ran.stdout.trim().to_owned(), id, expires)
}

/// `agent-shim ARGS` as the sub-agent, with the token in its environment.
fn with_token(broker: &Broker, token: &str, args: &[&str]) -> Ran {
    let mut cmd = shim_command(&broker.socket, PRINCIPAL_UID, args);
    cmd.env("KEYWARD_TOKEN", token);
    Ran::from(cmd.output().unwrap())
}

/// The real `aws` CLI, with only the given credentials.
fn aws(moto: &Moto, env: &[(&str, &str)], args: &[&str]) -> Ran {
    let mut cmd = Command::new(moto.venv.join("bin/aws"));
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ran::from(cmd.output().unwrap())
}

fn assert_no_admin_secret(moto: &Moto, what: &str, text: &str) {
    for form in leaked_forms(&moto.admin_secret) {
        assert!(
            !text.contains(&form),
            "{what} contains the admin secret (as {form:?}):\n{text}"
        );
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn the_proxied_tool_reads_the_one_object_and_no_other() {
    let Some(moto) = start_moto() else { return };
    let broker = start_broker(&moto, true);
    let (token, _, _) = mint(
        &broker,
        &[
            "--tool",
            "read_analysis",
            "--param",
            "key=file.txt",
            "--ttl",
            "5m",
        ],
    );

    let read = with_token(&broker, &token, &["call", "read_analysis", "key=file.txt"]);
    assert_eq!(read.code, Some(0), "{read:?}");
    assert_eq!(read.stdout, "the one object\n", "{read:?}");

    // The sibling exists and the admin key may read it: the token's pin
    // is what stops it.
    let sibling = with_token(
        &broker,
        &token,
        &["call", "read_analysis", "key=sibling.txt"],
    );
    assert_eq!(sibling.code, Some(3), "{sibling:?}");
    assert!(sibling.stderr.contains("key"), "{sibling:?}");
    assert!(!sibling.stdout.contains("the sibling"), "{sibling:?}");
    // Leaving the prefix is refused by the parameter's own rule.
    let escape = with_token(&broker, &token, &["call", "read_analysis", "key=../x"]);
    assert_eq!(escape.code, Some(3), "{escape:?}");

    // The request was signed: without a signature moto refuses it.
    let unsigned = aws(
        &moto,
        &[
            ("AWS_ENDPOINT_URL", &moto.endpoint),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ],
        &[
            "s3",
            "cp",
            "--no-sign-request",
            "s3://project-bucket/analysis/file.txt",
            "-",
        ],
    );
    assert_ne!(unsigned.code, Some(0), "{unsigned:?}");

    for (what, text) in [
        ("read", format!("{read:?}")),
        ("sibling", format!("{sibling:?}")),
        ("audit", broker.audit()),
    ] {
        assert_no_admin_secret(&moto, what, &text);
    }
}

#[test]
fn derived_credentials_reach_the_program_read_the_object_and_nothing_else() {
    let Some(moto) = start_moto() else { return };
    let broker = start_broker(&moto, true);
    let (token, id, expires) = mint(
        &broker,
        &[
            "--tool",
            "s3_read_credentials",
            "--param",
            "key=file.txt",
            "--ttl",
            "20m",
        ],
    );

    // The sandboxed program (which has no network: it hands what it got
    // to this test through its one writable directory).
    let work = tempfile::Builder::new().prefix("kw-aws").tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = work.path().join("env");
    let script = format!("env > {}; echo ran", out.display());
    let run = with_token(
        &broker,
        &token,
        &[
            "run",
            "--allow-write",
            work.path().to_str().unwrap(),
            "--derive",
            "s3_read_credentials",
            "key=file.txt",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout, "ran\n", "{run:?}");
    let mut env_text = String::new();
    std::fs::File::open(&out)
        .unwrap()
        .read_to_string(&mut env_text)
        .unwrap();
    let var = |name: &str| -> String {
        env_text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} not in the program's environment:\n{env_text}"))
            .to_owned()
    };
    let key_id = var("AWS_ACCESS_KEY_ID");
    let secret = var("AWS_SECRET_ACCESS_KEY");
    let session = var("AWS_SESSION_TOKEN");
    assert_ne!(key_id, moto.admin_key_id);
    assert_eq!(var("AWS_REGION"), "us-east-1");
    assert_eq!(var("AWS_ENDPOINT_URL"), moto.endpoint);
    // Only in the program's environment: not in the shim's output.
    for text in [&run.stdout, &run.stderr] {
        assert!(
            !text.contains(&secret) && !text.contains(&session),
            "{run:?}"
        );
    }
    assert!(!broker.audit().contains(&secret));

    let derived = [
        ("AWS_ACCESS_KEY_ID", key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
        ("AWS_SESSION_TOKEN", session.as_str()),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", moto.endpoint.as_str()),
    ];
    let read = aws(
        &moto,
        &derived,
        &["s3", "cp", "s3://project-bucket/analysis/file.txt", "-"],
    );
    assert_eq!(read.code, Some(0), "{read:?}");
    assert_eq!(read.stdout, "the one object\n");
    // The role may read all of analysis/; the session policy the broker
    // rendered from the token's pin may not.
    let sibling = aws(
        &moto,
        &derived,
        &["s3", "cp", "s3://project-bucket/analysis/sibling.txt", "-"],
    );
    assert_ne!(sibling.code, Some(0), "{sibling:?}");
    assert!(!sibling.stdout.contains("the sibling"), "{sibling:?}");
    assert!(
        sibling.stderr.contains("403") || sibling.stderr.contains("AccessDenied"),
        "{sibling:?}"
    );
    let write = aws(
        &moto,
        &derived,
        &[
            "s3",
            "cp",
            "/etc/hostname",
            "s3://project-bucket/analysis/file.txt",
        ],
    );
    assert_ne!(write.code, Some(0), "{write:?}");
    assert!(
        write.stderr.contains("AccessDenied") || write.stderr.contains("403"),
        "{write:?}"
    );
    let after = aws(
        &moto,
        &derived,
        &["s3", "cp", "s3://project-bucket/analysis/file.txt", "-"],
    );
    assert_eq!(after.stdout, "the one object\n", "{after:?}");

    // The real aws CLI as the sandboxed program: `--derive` puts the
    // credentials in its environment and `--allow-connect` lets it reach
    // the endpoint's port, and no other.
    let python = venv_python("import awscli", PRINCIPAL_UID).unwrap();
    let port = moto
        .endpoint
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/');
    let sandboxed = |program: &[&str]| -> Ran {
        let venv = python.venv.display().to_string();
        let exe = python.exe.display().to_string();
        let mut args = vec![
            "run",
            "--allow-read",
            venv.as_str(),
            "--allow-connect",
            port,
            "--keep-env",
            "HOME",
            "--derive",
            "s3_read_credentials",
            "key=file.txt",
        ];
        if python.pythonpath.is_some() {
            args.extend(["--keep-env", "PYTHONPATH"]);
        }
        args.push("--");
        args.push(exe.as_str());
        args.extend(program);
        let mut cmd = shim_command(&broker.socket, PRINCIPAL_UID, &args);
        cmd.env("KEYWARD_TOKEN", &token).env("HOME", "/tmp");
        if let Some(path) = &python.pythonpath {
            cmd.env("PYTHONPATH", path);
        }
        Ran::from(cmd.output().unwrap())
    };
    let inside = sandboxed(&[
        "-m",
        "awscli",
        "s3",
        "cp",
        "s3://project-bucket/analysis/file.txt",
        "-",
    ]);
    assert_eq!(inside.code, Some(0), "{inside:?}");
    assert_eq!(inside.stdout, "the one object\n", "{inside:?}");
    let inside_sibling = sandboxed(&[
        "-m",
        "awscli",
        "s3",
        "cp",
        "s3://project-bucket/analysis/sibling.txt",
        "-",
    ]);
    assert_ne!(inside_sibling.code, Some(0), "{inside_sibling:?}");
    assert!(
        !inside_sibling.stdout.contains("the sibling"),
        "{inside_sibling:?}"
    );
    // Another port (a listener of this test's) is out of reach, the
    // endpoint's is not.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port().to_string();
    // Also as MPTCP, a stream protocol Landlock's TCP rules do not judge,
    // and by TCP Fast Open, a connect inside sendmsg.
    let probe = "import socket, sys\nfor port in sys.argv[1:]:\n    for proto in (0, 262):\n        try:\n            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)\n            s.connect(('127.0.0.1', int(port)))\n            print(f'{port}/{proto}', 'open')\n        except OSError as e:\n            print(f'{port}/{proto}', 'refused', e.errno)\n    try:\n        s = socket.socket()\n        s.sendmsg([b'x'], [], socket.MSG_FASTOPEN, ('127.0.0.1', int(port)))\n        print(f'{port}/tfo', 'open')\n    except OSError as e:\n        print(f'{port}/tfo', 'refused', e.errno)\n";
    let reach = sandboxed(&["-c", probe, port, other_port.as_str()]);
    assert_eq!(reach.code, Some(0), "{reach:?}");
    assert!(
        reach.stdout.contains(&format!("{port}/0 open")),
        "{reach:?}"
    );
    assert!(
        reach.stdout.contains(&format!("{other_port}/0 refused 13")),
        "{reach:?}"
    );
    // EPERM (1): seccomp's answer, not the kernel's own refusal of a
    // protocol or flag it does not support.
    assert!(
        reach
            .stdout
            .lines()
            .any(|l| l == format!("{other_port}/262 refused 1")),
        "{reach:?}"
    );
    // EPERM (1): seccomp's answer, not the kernel's own refusal of a
    // protocol or flag it does not support.
    assert!(
        reach
            .stdout
            .lines()
            .any(|l| l == format!("{other_port}/tfo refused 1")),
        "{reach:?}"
    );
    for ran in [&inside, &inside_sibling, &reach] {
        assert_no_admin_secret(&moto, "the sandboxed aws CLI", &format!("{ran:?}"));
    }

    // CloudTrail's view: the session is named after the token.
    let who = aws(&moto, &derived, &["sts", "get-caller-identity"]);
    assert_eq!(who.code, Some(0), "{who:?}");
    assert!(
        who.stdout
            .contains(&format!("assumed-role/agent-reader/kw-{id}")),
        "{who:?}"
    );

    // Expiry: no later than the token's; moto does not expire sessions,
    // so what the broker asked for is checked.
    let direct = with_token(
        &broker,
        &token,
        &["call", "--json", "s3_read_credentials", "key=file.txt"],
    );
    assert_eq!(direct.code, Some(0), "{direct:?}");
    let envelope: serde_json::Value = serde_json::from_str(&direct.stdout).unwrap();
    let body: serde_json::Value = serde_json::from_str(envelope["body"].as_str().unwrap()).unwrap();
    let expiration =
        humantime::parse_rfc3339_weak(body["Expiration"].as_str().unwrap().trim_end_matches('Z'))
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
    assert!(
        expiration <= expires,
        "{expiration} > token expiry {expires}"
    );
    // max_duration (15 m) is shorter than the token's 20 m here.
    assert!(expiration <= now() + 15 * 60 + 5, "{body}");

    for (what, text) in [
        ("the program's environment", env_text.clone()),
        ("run", format!("{run:?}")),
        ("the call", format!("{direct:?}")),
        ("audit", broker.audit()),
    ] {
        assert_no_admin_secret(&moto, what, &text);
        assert!(
            !text.contains(&moto.admin_key_id) || what == "audit",
            "{what}: {text}"
        );
    }
}

#[test]
fn derivation_refuses_what_would_widen_or_outlive_the_token() {
    let Some(moto) = start_moto() else { return };
    let broker = start_broker(&moto, true);

    // A key outside the token's pin.
    let (token, _, _) = mint(
        &broker,
        &[
            "--tool",
            "s3_read_credentials",
            "--param",
            "key=file.txt",
            "--ttl",
            "20m",
        ],
    );
    let other = with_token(
        &broker,
        &token,
        &["call", "s3_read_credentials", "key=sibling.txt"],
    );
    assert_eq!(other.code, Some(3), "{other:?}");
    let run = with_token(
        &broker,
        &token,
        &[
            "run",
            "--derive",
            "s3_read_credentials",
            "key=sibling.txt",
            "--",
            "/bin/true",
        ],
    );
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stderr.contains("--derive s3_read_credentials"),
        "{run:?}"
    );

    // An IAM wildcard through a loosely declared parameter: the token's
    // pattern admits it, the broker does not place it in a policy.
    let (loose, _, _) = mint(
        &broker,
        &["--tool", "s3_loose", "--pattern", "key=.*", "--ttl", "20m"],
    );
    let wildcard = with_token(&broker, &loose, &["call", "s3_loose", "key=*"]);
    assert_eq!(wildcard.code, Some(3), "{wildcard:?}");
    assert!(wildcard.stderr.contains("wildcard"), "{wildcard:?}");
    assert!(!wildcard.stdout.contains("SecretAccessKey"), "{wildcard:?}");

    // A token with less than STS's 900 s minimum left.
    let (short, _, _) = mint(
        &broker,
        &[
            "--tool",
            "s3_read_credentials",
            "--param",
            "key=file.txt",
            "--ttl",
            "5m",
        ],
    );
    let refused = with_token(
        &broker,
        &short,
        &["call", "s3_read_credentials", "key=file.txt"],
    );
    assert_eq!(refused.code, Some(3), "{refused:?}");
    assert!(refused.stderr.contains("would outlive it"), "{refused:?}");

    // GetFederationToken (no role): signed, answered, parsed.
    let (fed, id, expires) = mint(
        &broker,
        &[
            "--tool",
            "s3_federated",
            "--param",
            "key=file.txt",
            "--ttl",
            "30m",
        ],
    );
    let federated = with_token(
        &broker,
        &fed,
        &["call", "--json", "s3_federated", "key=file.txt"],
    );
    assert_eq!(federated.code, Some(0), "{federated:?}");
    let envelope: serde_json::Value = serde_json::from_str(&federated.stdout).unwrap();
    let body: serde_json::Value = serde_json::from_str(envelope["body"].as_str().unwrap()).unwrap();
    assert!(
        body["SessionToken"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    let expiration =
        humantime::parse_rfc3339_weak(body["Expiration"].as_str().unwrap().trim_end_matches('Z'))
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
    assert!(expiration <= expires, "{expiration} > {expires}");
    assert!(!id.is_empty());

    for (what, text) in [
        ("run", format!("{run:?}")),
        ("federated", format!("{federated:?}")),
        ("audit", broker.audit()),
    ] {
        assert_no_admin_secret(&moto, what, &text);
    }
}

/// A reload cannot turn the AWS key the broker loaded at start into a
/// plain secret that a bearer tool sends whole: the upstream (a loopback
/// listener here) only ever sees a signature.
#[test]
fn a_reload_cannot_send_the_aws_key_as_a_bearer() {
    use std::io::Write as _;
    const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&head));
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        }
    });
    let head = format!(
        r#"[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_call = ["read"]
"#
    );
    let tool = format!(
        "[[tool]]\nname = \"read\"\nkind = \"http\"\ncredential = \"aws_admin\"\n\
         method = \"GET\"\nurl = \"http://127.0.0.1:{port}/bucket/a\"\n"
    );
    let signed = format!(
        "{head}[credential.aws_admin]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\n\
         secret_access_key_file = \"aws.secret\"\n\n{tool}\
         auth = {{ aws_sigv4 = {{ service = \"s3\" }} }}\n"
    );
    let broker = Broker::start(&signed, &[("aws.secret", AWS_SECRET)]);
    let ran = broker.call(PRINCIPAL_UID, &["read"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        seen.lock()
            .unwrap()
            .contains("authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/"),
        "{}",
        seen.lock().unwrap()
    );

    // Same credential name, now a plain file sent as a bearer.
    broker.rewrite_config(&format!(
        "{head}[credential.aws_admin]\nfile = \"aws.secret\"\n\n{tool}auth = {{ bearer = true }}\n"
    ));
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        let reloads: Vec<_> = broker
            .audit_records()
            .into_iter()
            .filter(|r| r["event"] == "reload")
            .collect();
        if let Some(last) = reloads.last() {
            break last.clone();
        }
        assert!(Instant::now() < deadline, "no reload record");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(refusal["decision"], "error", "{refusal}");
    assert!(
        refusal["reason"]
            .as_str()
            .unwrap()
            .contains("loaded at start as an AWS key"),
        "{refusal}"
    );
    let ran = broker.call(PRINCIPAL_UID, &["read"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.matches("AWS4-HMAC-SHA256").count(), 2, "{seen}");
    for form in leaked_forms(AWS_SECRET) {
        assert!(!seen.contains(&form), "the upstream got the key: {seen}");
    }
}
