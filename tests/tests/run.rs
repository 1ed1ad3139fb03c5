// SPDX-License-Identifier: Apache-2.0
//! `agent-shim run` as a supervisor: it refuses root, leaves no
//! capability to the program, lets nothing the program started outlive
//! it (in namespace and in fallback mode), and does not hang when started
//! with `SIGCHLD` ignored; the two modes, and how each is reported; and
//! the token rules `call`, `tools` and `attenuate` share with `run`.
#![allow(clippy::unwrap_used, unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyward_tests::{binary, require_root, Ran, PRINCIPAL_UID};

/// `agent-shim run ARGS` as the unprivileged test uid, without a token
/// (no broker is needed to test the sandbox's own supervision).
fn shim_run(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("agent-shim"));
    cmd.arg("run")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .uid(PRINCIPAL_UID)
        .gid(PRINCIPAL_UID);
    cmd
}

/// Wait for `child` (started with no pipes: a survivor holding one would
/// keep a reader waiting), killing it and failing after `limit`.
fn wait_within(mut child: std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn root_is_refused() {
    require_root();
    let ran = Ran::from(
        Command::new(binary("agent-shim"))
            .args(["run", "--", "/bin/true"])
            .env_clear()
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("as root"), "{ran:?}");
}

/// A shim started with capabilities (here an ambient CAP_NET_RAW, as a
/// file capability or a service manager could give it) passes none on.
#[test]
fn the_program_gets_no_capability() {
    require_root();
    let ran = Ran::from(
        Command::new("setpriv")
            .args([
                &format!("--reuid={PRINCIPAL_UID}"),
                &format!("--regid={PRINCIPAL_UID}"),
                "--clear-groups",
                "--inh-caps=+net_raw",
                "--ambient-caps=+net_raw",
            ])
            .arg(binary("agent-shim"))
            .args(["run", "--", "/bin/grep", "^Cap", "/proc/self/status"])
            .env_clear()
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert!(
            ran.stdout.contains(&format!("{set}:\t0000000000000000")),
            "{set} not empty: {ran:?}"
        );
    }
}

#[test]
fn nothing_the_program_started_outlives_it() {
    require_root();
    for (fallback, marker) in [(false, "31.4159"), (true, "27.1828")] {
        // A double fork into a session of its own: the sleeper is orphaned
        // when its parent subshell exits, then the program exits at once.
        let script = format!("(setsid sleep {marker} &); exit 7");
        let mut cmd = shim_run(&["--", "/bin/sh", "-c", &script]);
        if fallback {
            cmd.env("KEYWARD_TEST_NO_USERNS", "1");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert_eq!(wait_within(child, Duration::from_secs(20)), Some(7));
        let survivors: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(marker))
            .collect();
        assert!(
            survivors.is_empty(),
            "fallback={fallback}: still running: {survivors:?}"
        );
    }
}

/// Namespace mode: the program is pid 2 under the shim's init, sees no
/// `/home` or `/run`, has a private writable `/tmp` and a minimal `/dev`;
/// `-v` says which mode. Fallback mode says so once on stderr, and
/// `--require-namespaces` refuses it.
#[test]
fn the_two_modes_and_how_they_are_reported() {
    require_root();
    let script = "echo pid=$$; test -e /home || echo no-home; test -e /run || echo no-run; \
                  echo x > /tmp/f && cat /tmp/f; test -c /dev/null && echo null-ok; \
                  test -e /dev/kmsg || echo no-kmsg";
    let ran = Ran::from(
        shim_run(&["-v", "--", "/bin/sh", "-c", script])
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    for want in ["pid=2", "no-home", "no-run", "x\n"] {
        assert!(ran.stdout.contains(want), "{want}: {ran:?}");
    }
    assert!(ran.stdout.contains("null-ok"), "{ran:?}");
    assert!(ran.stdout.contains("no-kmsg"), "{ran:?}");
    assert!(ran.stderr.contains("mode: namespaces"), "{ran:?}");
    assert!(!ran.stderr.contains("warning"), "{ran:?}");

    let ran = Ran::from(
        shim_run(&["-v", "--", "/bin/sh", "-c", "echo pid=$$"])
            .env("KEYWARD_TEST_NO_USERNS", "1")
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(!ran.stdout.contains("pid=2\n"), "{ran:?}");
    assert!(ran.stderr.contains("mode: fallback"), "{ran:?}");
    assert_eq!(
        ran.stderr.matches("namespaces unavailable").count(),
        1,
        "{ran:?}"
    );

    let ran = Ran::from(
        shim_run(&["--require-namespaces", "--", "/bin/true"])
            .env("KEYWARD_TEST_NO_USERNS", "1")
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("--require-namespaces"), "{ran:?}");
}

/// `call`, `tools` and `attenuate` read a token by `run`'s rules: an empty
/// or non-UTF-8 `$KEYWARD_TOKEN` is an error, not "no token".
#[test]
fn an_empty_or_binary_token_variable_is_an_error_for_every_command() {
    use std::os::unix::ffi::OsStrExt;
    require_root();
    for value in [&b""[..], &b"  \n"[..], &b"kw1.\xff"[..]] {
        for args in [
            &["tools"][..],
            &["call", "echo", "message=x"],
            &["attenuate"],
        ] {
            let ran = Ran::from(
                Command::new(binary("agent-shim"))
                    .args(args)
                    .env_clear()
                    .env("KEYWARD_SOCKET", "/nonexistent/kw.sock")
                    .env("KEYWARD_TOKEN", std::ffi::OsStr::from_bytes(value))
                    .output()
                    .unwrap(),
            );
            assert_eq!(ran.code, Some(1), "{args:?} {value:?}: {ran:?}");
            assert!(
                ran.stderr.contains("token is empty") || ran.stderr.contains("KEYWARD_TOKEN"),
                "{args:?} {value:?}: {ran:?}"
            );
        }
    }
}

/// `call --token T` overwrites T in its command line, and a token from
/// `$KEYWARD_TOKEN` is overwritten in the environment block, before the
/// shim talks to the broker (here a socket that accepts and never
/// answers); root can read both files whatever the shim's dumpability.
#[test]
fn call_overwrites_the_token_in_its_command_line() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mute.sock");
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&listener),
        &UnixAddr::new(&path).unwrap(),
    )
    .unwrap();
    listen(&listener, Backlog::new(8).unwrap()).unwrap();
    let token = "kw1.scrub-me-3f9a";
    for (args, file, env) in [
        (
            &["call", "--token", token, "echo", "message=x"][..],
            "cmdline",
            "",
        ),
        (&["tools", "--token", token][..], "cmdline", ""),
        (&["tools"][..], "environ", token),
    ] {
        let mut cmd = Command::new(binary("agent-shim"));
        cmd.args(args).env_clear().env("KEYWARD_SOCKET", &path);
        if !env.is_empty() {
            cmd.env("KEYWARD_TOKEN", env);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let shown = format!("/proc/{}/{file}", child.id());
        let mut seen = String::new();
        for _ in 0..100 {
            seen = String::from_utf8_lossy(&std::fs::read(&shown).unwrap_or_default()).into_owned();
            if seen.contains("*****") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(!seen.contains("scrub-me"), "{args:?} {file}: {seen:?}");
        assert!(seen.contains("*****"), "{args:?} {file}: {seen:?}");
    }
}

#[test]
fn an_ignored_sigchld_does_not_hang_the_shim() {
    require_root();
    let mut cmd = shim_run(&["--", "/bin/true"]);
    // SAFETY: between fork and exec this only calls `signal`, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(wait_within(child, Duration::from_secs(20)), Some(0));
}

#[test]
fn a_token_variable_that_is_not_text_is_an_error_not_no_token() {
    use std::os::unix::ffi::OsStrExt;
    require_root();
    let ran = Ran::from(
        shim_run(&["--", "/bin/true"])
            .env(
                "KEYWARD_TOKEN",
                std::ffi::OsStr::from_bytes(b"kw1.\xff\xfe"),
            )
            .output()
            .unwrap(),
    );
    assert_ne!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stderr.contains("KEYWARD_TOKEN"), "{ran:?}");
}
