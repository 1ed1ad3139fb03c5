// SPDX-License-Identifier: Apache-2.0
//! Real programs run unchanged inside `agent-shim run`, in namespace mode
//! and in fallback mode (`KEYWARD_TEST_NO_USERNS=1`): Python's `tempfile`,
//! `multiprocessing.Pool` and `ProcessPoolExecutor`, `python3 -m venv` and
//! `pip install --no-index` of a wheel built here, Node's `fs` and
//! `child_process`, `git init`/`commit`, a shell pipeline, `mktemp`, and
//! the `/etc` files runtimes read. Each passes, or, in fallback mode, fails
//! for the documented reason, which the test asserts (docs/THREAT_MODEL.md,
//! "What runs inside").
//!
//! Also the sandbox's root itself: the private `/tmp` shows none of the
//! host's `/tmp` and keeps nothing after the run; `/dev/tty` exists only
//! with `--tty`; system paths that are symbolic links (an `/etc` made of
//! absolute links, as on NixOS) show what they point at.
//!
//! Everything runs as the unprivileged test uid, with the system Python
//! (`/usr/bin/python3`: a pyenv in root's home is out of its reach) and
//! the `node` on `PATH`.
#![allow(clippy::unwrap_used, unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use keyward_tests::{binary, require_root, Ran, PRINCIPAL_UID};

/// The system interpreter (Debian's, with `venv` and `ensurepip`).
const PYTHON: &str = "/usr/bin/python3";
/// `PATH` inside (git is in /usr/local/bin on some hosts).
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The name the generated `passwd` gives the caller (the test uid has no
/// host entry, so the shim names it after `$USER`).
const USER: &str = "kwagent";

/// Why `multiprocessing` fails in fallback mode: its locks are POSIX
/// semaphores, files in `/dev/shm`, and fallback mode has no private
/// `/dev/shm` to give (the host's holds the orchestrator's shared memory,
/// so Landlock keeps it closed).
const NO_SHM: &str = "PermissionError: [Errno 13] Permission denied";

/// Why `python3 -m venv` and `git init` fail in fallback mode: they
/// `chmod` files by path, and fallback mode's seccomp filter denies the
/// path-based `chmod` family (Landlock cannot confine it to the allowed
/// paths, so it would reach every file of the uid, `~/.aws/credentials`
/// included).
const NO_CHMOD: &str = "Operation not permitted";

/// A work directory the test uid owns, outside `/tmp` (the sandbox's
/// `/tmp` must not show anything of the host's).
struct Work {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::Builder::new()
            .prefix("compat")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("work");
        std::fs::create_dir(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(PRINCIPAL_UID), Some(PRINCIPAL_UID)).unwrap();
        Work { _dir: dir, path }
    }
}

/// `agent-shim run --allow-write WORK [extra] -- program...` as the test
/// uid, in the work directory; namespace mode is required unless
/// `fallback`.
fn sandboxed(fallback: bool, work: &Path, extra: &[&str], program: &[&str]) -> Ran {
    let mut cmd = Command::new(binary("agent-shim"));
    cmd.env_clear()
        .env("PATH", PATH)
        .env("USER", USER)
        .env("HOME", work)
        .env("LANG", "C.UTF-8")
        .arg("run")
        .arg("--allow-write")
        .arg(work)
        .args(extra);
    if fallback {
        cmd.env("KEYWARD_TEST_NO_USERNS", "1");
    } else {
        cmd.arg("--require-namespaces");
    }
    cmd.arg("--")
        .args(program)
        .current_dir(work)
        .stdin(Stdio::null())
        .uid(PRINCIPAL_UID)
        .gid(PRINCIPAL_UID);
    Ran::from(cmd.output().unwrap())
}

fn sh(fallback: bool, work: &Path, script: &str) -> Ran {
    sandboxed(fallback, work, &[], &["/bin/sh", "-c", script])
}

fn mode(fallback: bool) -> &'static str {
    if fallback {
        "fallback"
    } else {
        "namespaces"
    }
}

/// The value of `KEY=value` on a line of `out`.
fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {out:?}"))
}

/// The sandbox's `/tmp` (namespace mode) or private directory (fallback
/// mode): `TMPDIR` names it, it is writable and empty, it shows none of
/// the host's `/tmp`, the host's `/tmp` stays closed, and nothing written
/// there outlives the run. `mktemp`, Python's `mkstemp` and
/// `TemporaryDirectory` and a shell pipeline work.
#[test]
fn a_private_writable_tmp_that_shows_nothing_of_the_host_and_keeps_nothing() {
    require_root();
    let work = Work::new();
    // A file of the host's /tmp, world-readable; removed even on failure.
    let host = tempfile::Builder::new()
        .prefix("kw-compat-host-")
        .tempfile_in("/tmp")
        .unwrap();
    let host_file = host.path().to_owned();
    std::fs::write(&host_file, "host-tmp-content").unwrap();
    std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let left = format!("kw-compat-left-{}", std::process::id());
    let script = format!(
        r#"echo TMPDIR=$TMPDIR
echo LISTING=$(ls -A "$TMPDIR" | tr '\n' ' ')
echo HOSTLIST=$(ls -A /tmp 2>/dev/null | tr '\n' ' ')
cat {host} 2>/dev/null && echo READ-HOST-FILE
touch /tmp/{left}-host-tmp 2>/dev/null && test "$TMPDIR" != /tmp && echo WROTE-HOST-TMP
echo secret > "$TMPDIR/{left}"
echo MKTEMP=$(mktemp)
echo MKTEMPD=$(mktemp -d)
echo PIPE=$(printf 'b\na\nb\n' | sort | uniq -c | awk '{{print $2 $1}}' | tr '\n' ,)
{PYTHON} -c 'import tempfile, os
fd, p = tempfile.mkstemp(); os.write(fd, b"x"); os.close(fd)
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "f"), "w").write("y")
    print("PYDIR=" + d)
print("PYFILE=" + p)'
"#,
        host = host_file.display(),
    );
    for fallback in [false, true] {
        let m = mode(fallback);
        let ran = sh(fallback, &work.path, &script);
        assert_eq!(ran.code, Some(0), "{m}: {ran:?}");
        let out = &ran.stdout;
        let tmpdir = PathBuf::from(value(out, "TMPDIR"));
        if fallback {
            // A fresh directory of the shim's, not /tmp itself.
            assert!(tmpdir.starts_with(std::env::temp_dir()), "{m}: {ran:?}");
            assert_ne!(tmpdir, Path::new("/tmp"), "{m}: {ran:?}");
        } else {
            assert_eq!(tmpdir, Path::new("/tmp"), "{m}: {ran:?}");
        }
        // Empty at the start; the host's /tmp neither listed nor readable.
        assert_eq!(value(out, "LISTING").trim(), "", "{m}: {ran:?}");
        assert_eq!(value(out, "HOSTLIST").trim(), "", "{m}: {ran:?}");
        assert!(!out.contains("host-tmp-content"), "{m}: {ran:?}");
        assert!(!out.contains("READ-HOST-FILE"), "{m}: {ran:?}");
        assert!(!out.contains("WROTE-HOST-TMP"), "{m}: {ran:?}");
        assert!(
            !Path::new(&format!("/tmp/{left}-host-tmp")).exists(),
            "{m}: wrote the host's /tmp"
        );
        for key in ["MKTEMP", "MKTEMPD", "PYFILE", "PYDIR"] {
            assert!(
                Path::new(value(out, key)).starts_with(&tmpdir),
                "{m}: {key}: {ran:?}"
            );
        }
        assert_eq!(value(out, "PIPE"), "a1,b2,", "{m}: {ran:?}");
        // Gone after the run: the tmpfs died with the namespace, the
        // directory was removed by the shim; the host never had the file.
        assert!(!Path::new("/tmp").join(&left).exists(), "{m}");
        if fallback {
            assert!(!tmpdir.exists(), "{m}: {} left behind", tmpdir.display());
        }
        // A second run starts empty again.
        let again = sh(fallback, &work.path, "ls -A \"$TMPDIR\"; echo done");
        assert_eq!(again.stdout, "done\n", "{m}: {again:?}");
    }
    drop(host);
}

/// `multiprocessing.Pool` and `concurrent.futures.ProcessPoolExecutor`:
/// they work in namespace mode (a private `/dev/shm`); in fallback mode
/// they fail creating their first lock, a POSIX semaphore in the host's
/// `/dev/shm`, which Landlock keeps closed.
#[test]
fn python_multiprocessing_pools() {
    require_root();
    let work = Work::new();
    for (name, code) in [
        (
            "Pool",
            "import multiprocessing as mp\n\
             def sq(x): return x * x\n\
             if __name__ == '__main__':\n\
             \x20   with mp.Pool(2) as p: print('RESULT', p.map(sq, range(5)))",
        ),
        (
            "ProcessPoolExecutor",
            "import concurrent.futures as cf\n\
             def sq(x): return x * x\n\
             if __name__ == '__main__':\n\
             \x20   with cf.ProcessPoolExecutor(2) as e: print('RESULT', list(e.map(sq, range(5))))",
        ),
    ] {
        let script = work.path.join(format!("{name}.py"));
        std::fs::write(&script, code).unwrap();
        let script = script.to_str().unwrap();
        let ran = sandboxed(false, &work.path, &[], &[PYTHON, script]);
        assert_eq!(ran.code, Some(0), "{name}: {ran:?}");
        assert!(
            ran.stdout.contains("RESULT [0, 1, 4, 9, 16]"),
            "{name}: {ran:?}"
        );
        let ran = sandboxed(true, &work.path, &[], &[PYTHON, script]);
        assert_ne!(ran.code, Some(0), "{name} (fallback): {ran:?}");
        assert!(ran.stderr.contains("SemLock"), "{name} (fallback): {ran:?}");
        assert!(ran.stderr.contains(NO_SHM), "{name} (fallback): {ran:?}");
    }
}

/// `python3 -m venv` under the work directory, then `pip install
/// --no-index` of a wheel built here (offline), then import it. The venv's
/// scripts are not executable where the sandbox may write (Landlock grants
/// no execute there), so pip runs as `venv/bin/python -m pip`. In fallback
/// mode `venv` fails at its first `chmod` ([`NO_CHMOD`]).
#[test]
fn pip_installs_a_local_wheel_into_a_venv() {
    require_root();
    let work = Work::new();
    let build = Command::new(PYTHON)
        .arg("-c")
        .arg(WHEEL_BUILDER)
        .arg(&work.path)
        .output()
        .unwrap();
    assert!(build.status.success(), "{:?}", Ran::from(build));
    let wheel = work.path.join("kwdemo-0.1-py3-none-any.whl");
    std::os::unix::fs::chown(&wheel, Some(PRINCIPAL_UID), Some(PRINCIPAL_UID)).unwrap();
    for fallback in [false, true] {
        let m = mode(fallback);
        let venv = work.path.join(format!("venv-{m}"));
        let script = format!(
            "set -e\n\
             {PYTHON} -m venv {venv}\n\
             {venv}/bin/python -m pip install --no-index --no-cache-dir \
             --disable-pip-version-check --quiet {wheel}\n\
             {venv}/bin/python -c 'import kwdemo; print(kwdemo.hello())'\n\
             {venv}/bin/python -m pip list --disable-pip-version-check 2>/dev/null | grep kwdemo",
            venv = venv.display(),
            wheel = wheel.display(),
        );
        let ran = sh(fallback, &work.path, &script);
        if fallback {
            // venv hides what its ensurepip step printed; without pip the
            // reason shows: the chmod of the scripts it copies.
            assert_ne!(ran.code, Some(0), "{m}: {ran:?}");
            assert!(ran.stderr.contains("ensurepip"), "{m}: {ran:?}");
            let bare = work.path.join("venv-without-pip");
            let ran = sandboxed(
                true,
                &work.path,
                &[],
                &[
                    PYTHON,
                    "-m",
                    "venv",
                    "--without-pip",
                    bare.to_str().unwrap(),
                ],
            );
            assert_ne!(ran.code, Some(0), "{m}: {ran:?}");
            assert!(
                ran.stderr
                    .contains(&format!("[Errno 1] {NO_CHMOD}: '{}/bin/", bare.display())),
                "{m}: {ran:?}"
            );
            continue;
        }
        assert_eq!(ran.code, Some(0), "{m}: {ran:?}");
        assert!(ran.stdout.contains("hello from kwdemo"), "{m}: {ran:?}");
        assert!(ran.stdout.contains("kwdemo"), "{m}: {ran:?}");
        assert!(!ran.stderr.contains("PermissionError"), "{m}: {ran:?}");
    }
}

/// Writes `kwdemo-0.1-py3-none-any.whl` into argv[1]: a pure-Python wheel
/// with a correct RECORD.
const WHEEL_BUILDER: &str = r#"
import base64, hashlib, os, sys, zipfile
files = {
    "kwdemo/__init__.py": "def hello():\n    return 'hello from kwdemo'\n",
    "kwdemo-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: kwdemo\nVersion: 0.1\n",
    "kwdemo-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: keyward-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for name, text in files.items():
    digest = hashlib.sha256(text.encode()).digest()
    b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    record.append(f"{name},sha256={b64},{len(text.encode())}")
record.append("kwdemo-0.1.dist-info/RECORD,,")
files["kwdemo-0.1.dist-info/RECORD"] = "\n".join(record) + "\n"
with zipfile.ZipFile(os.path.join(sys.argv[1], "kwdemo-0.1-py3-none-any.whl"), "w") as z:
    for name, text in files.items():
        z.writestr(name, text)
"#;

/// Node's `fs` (the work directory and `os.tmpdir()`) and `child_process`
/// (`execFileSync`, `spawnSync`, an async `exec` of a pipeline).
#[test]
fn node_fs_and_child_process() {
    require_root();
    let Some(node) = find_node() else {
        return;
    };
    let work = Work::new();
    let script = r#"
const fs = require('fs'), os = require('os'), path = require('path'), cp = require('child_process');
const f = path.join(process.cwd(), 'node.txt');
fs.writeFileSync(f, 'from node');
const t = path.join(os.tmpdir(), 'node-tmp.txt');
fs.writeFileSync(t, 'tmp');
console.log('FS=' + fs.readFileSync(f, 'utf8') + '+' + fs.readFileSync(t, 'utf8'));
console.log('TMP=' + os.tmpdir());
console.log('EXEC=' + cp.execFileSync('/bin/sh', ['-c', 'echo abc | tr a-z A-Z']).toString().trim());
const r = cp.spawnSync('cat', [f]);
console.log('SPAWN=' + r.status + ':' + r.stdout.toString());
cp.exec('printf "3\n1\n2\n" | sort -n | tr "\n" ,', (err, out) => {
  if (err) { console.log('ASYNC-ERR ' + err); process.exit(1); }
  console.log('ASYNC=' + out);
});
"#;
    for fallback in [false, true] {
        let m = mode(fallback);
        let ran = sandboxed(fallback, &work.path, &[], &[&node, "-e", script]);
        assert_eq!(ran.code, Some(0), "{m}: {ran:?}");
        let out = &ran.stdout;
        assert_eq!(value(out, "FS"), "from node+tmp", "{m}: {ran:?}");
        assert_eq!(value(out, "EXEC"), "ABC", "{m}: {ran:?}");
        assert_eq!(value(out, "SPAWN"), "0:from node", "{m}: {ran:?}");
        assert_eq!(value(out, "ASYNC"), "1,2,3,", "{m}: {ran:?}");
        if !fallback {
            assert_eq!(value(out, "TMP"), "/tmp", "{m}: {ran:?}");
        }
    }
}

/// The `node` on `PATH`, canonical (what the sandbox executes); `None`
/// with a loud message where there is none (CI installs it).
fn find_node() -> Option<String> {
    let found = Command::new("/bin/sh")
        .args(["-c", "command -v node"])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    if path.is_empty() {
        assert!(
            std::env::var_os("CI").is_none_or(|v| v != "true"),
            "node is not installed in CI"
        );
        eprintln!("\n*** SKIPPED: node is not installed ***\n");
        return None;
    }
    Some(
        std::fs::canonicalize(path)
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    )
}

/// `git init`, `add`, `commit` and `log` in the work directory. In
/// fallback mode `git init` fails at its `chmod` of `.git/config.lock`
/// ([`NO_CHMOD`]).
#[test]
fn git_init_and_commit_in_the_work_dir() {
    require_root();
    let work = Work::new();
    for fallback in [false, true] {
        let m = mode(fallback);
        let repo = work.path.join(format!("repo-{m}"));
        let script = format!(
            "set -e; git init -q {repo}; cd {repo}; echo hello > a.txt; git add a.txt; \
             git -c user.name=agent -c user.email=agent@example.com commit -q -m first; \
             git log --format=LOG=%s; git status --porcelain | wc -l",
            repo = repo.display()
        );
        let ran = sh(fallback, &work.path, &script);
        if fallback {
            assert_ne!(ran.code, Some(0), "{m}: {ran:?}");
            assert!(
                ran.stderr.contains("chmod on ") && ran.stderr.contains(NO_CHMOD),
                "{m}: {ran:?}"
            );
            continue;
        }
        assert_eq!(ran.code, Some(0), "{m}: {ran:?}");
        assert_eq!(value(&ran.stdout, "LOG"), "first", "{m}: {ran:?}");
        assert!(ran.stdout.ends_with("0\n"), "{m}: {ran:?}");
    }
}

/// The `/etc` files runtimes read are readable in both modes; in namespace
/// mode `passwd` and `group` are generated (root, the caller, nobody), not
/// the host's.
#[test]
fn the_etc_files_runtimes_read() {
    require_root();
    let work = Work::new();
    let mut files = vec![
        "/etc/debian_version",
        "/etc/os-release",
        "/usr/lib/os-release",
        "/etc/localtime",
        "/etc/passwd",
        "/etc/group",
        "/etc/nsswitch.conf",
        "/etc/ca-certificates.conf",
        "/etc/hosts",
        "/etc/ld.so.cache",
        "/etc/ssl/certs/ca-certificates.crt",
    ];
    if Path::new("/etc/resolv.conf").exists() {
        files.push("/etc/resolv.conf");
    }
    files.retain(|f| Path::new(f).exists());
    assert!(files.len() >= 10, "this host lacks too many of {files:?}");
    let script = format!(
        "for f in {}; do head -c1 $f >/dev/null && echo READ=$f || echo FAILED=$f; done\n\
         ls /etc/ssl/certs | grep -c pem | sed s/^/PEMS=/\n\
         cat /etc/ssl/certs/$(ls /etc/ssl/certs | grep pem | head -1) | head -1 | sed s/^/CERT=/\n\
         echo ID=$(id -un):$(id -gn)\n\
         echo PASSWD_LINES=$(wc -l < /etc/passwd)\n\
         echo PASSWD_BYTES=$(wc -c < /etc/passwd)\n\
         getent passwd $(id -u) | sed s/^/ENTRY=/\n\
         {PYTHON} -c 'import platform, ssl, time; print(\"OS=\" + platform.freedesktop_os_release()[\"ID\"]); \
         print(\"TZ=\" + time.strftime(\"%Z\")); ctx = ssl.create_default_context(); print(\"SSL=ok\")'",
        files.join(" ")
    );
    for fallback in [false, true] {
        let m = mode(fallback);
        let ran = sh(fallback, &work.path, &script);
        assert_eq!(ran.code, Some(0), "{m}: {ran:?}");
        let out = &ran.stdout;
        for f in &files {
            assert!(out.contains(&format!("READ={f}\n")), "{m}: {f}: {ran:?}");
        }
        assert!(
            value(out, "PEMS").parse::<u32>().unwrap() > 10,
            "{m}: {ran:?}"
        );
        assert_eq!(value(out, "CERT"), "-----BEGIN CERTIFICATE-----", "{m}");
        assert_eq!(value(out, "OS"), "debian", "{m}: {ran:?}");
        assert_eq!(value(out, "SSL"), "ok", "{m}: {ran:?}");
        if fallback {
            // The host's files: the caller has an entry if the host gives
            // it one (the test uid has none).
            let host = std::fs::metadata("/etc/passwd").unwrap().len();
            assert_eq!(value(out, "PASSWD_BYTES"), host.to_string(), "{m}");
        } else {
            assert_eq!(value(out, "PASSWD_LINES"), "3", "{m}: {ran:?}");
            assert_eq!(value(out, "ID"), format!("{USER}:{USER}"), "{m}: {ran:?}");
            assert!(
                value(out, "ENTRY")
                    .starts_with(&format!("{USER}:x:{PRINCIPAL_UID}:{PRINCIPAL_UID}:")),
                "{m}: {ran:?}"
            );
        }
    }
}

/// `/dev/tty` is in the namespace root's `/dev` only with `--tty` (without
/// it the program has no business with a terminal).
#[test]
fn dev_tty_exists_only_with_tty() {
    require_root();
    let work = Work::new();
    let script = &[
        "/bin/sh",
        "-c",
        "test -e /dev/tty && echo TTY=yes || echo TTY=no",
    ];
    let without = sandboxed(false, &work.path, &[], script);
    assert_eq!(value(&without.stdout, "TTY"), "no", "{without:?}");
    let with = sandboxed(false, &work.path, &["--tty"], script);
    assert_eq!(value(&with.stdout, "TTY"), "yes", "{with:?}");
}

/// System paths that are symbolic links to places the sandbox does not
/// show (an `/etc` made of absolute links, as on NixOS; a
/// `/etc/resolv.conf` into `/run`) show what they point at: the links are
/// resolved against the host's root, not the sandbox's scratch root, so
/// none is left dangling. The test builds such an `/etc` in a mount
/// namespace of its own (the host's is untouched).
#[test]
fn system_paths_that_are_links_show_their_targets() {
    require_root();
    let work = Work::new();
    let real = work.path.parent().unwrap().join("real-etc");
    std::fs::create_dir(&real).unwrap();
    let setup = format!(
        r#"set -e
mount --make-rprivate /
mount --bind /etc {real}
mount -t tmpfs -o mode=0755 tmpfs /etc
for f in {real}/* {real}/.[!.]*; do if [ -e "$f" ]; then ln -s "$f" /etc/"$(basename "$f")"; fi; done
test -L /etc/debian_version
exec setpriv --reuid={uid} --regid={uid} --clear-groups "$@""#,
        real = real.display(),
        uid = PRINCIPAL_UID,
    );
    let script = "for f in /etc/debian_version /etc/hosts /etc/ld.so.cache /etc/passwd; do \
                  head -c1 $f > /dev/null && echo READ=$f; done; cat /etc/debian_version";
    let ran = Ran::from(
        Command::new("unshare")
            .args(["--mount", "--", "/bin/sh", "-c", &setup, "setup"])
            .arg(binary("agent-shim"))
            .args(["run", "--require-namespaces", "--", "/bin/sh", "-c", script])
            .current_dir("/")
            .env_clear()
            .env("PATH", PATH)
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    for f in ["debian_version", "hosts", "ld.so.cache", "passwd"] {
        assert!(
            ran.stdout.contains(&format!("READ=/etc/{f}\n")),
            "{f}: {ran:?}"
        );
    }
    let version = std::fs::read_to_string("/etc/debian_version").unwrap();
    assert!(ran.stdout.ends_with(&version), "{ran:?}");
}

/// Another sandbox that may write to the work directory swaps a directory
/// on a caller's `--allow-read` path for a symbolic link after the shim
/// checked the path and before the sandbox is built (here: while the
/// broker, a stand-in, answers `Bind`). The link aims at the
/// orchestrator's secrets, as the host sees them and as the namespace
/// root's builder does (`/oldroot/...`). Neither the root nor Landlock
/// may follow it: the run is refused, and the secret never shows.
#[test]
fn a_caller_path_swapped_for_a_link_after_the_check_is_refused() {
    require_root();
    for (fallback, via_oldroot) in [(false, true), (false, false), (true, false)] {
        let work = Work::new();
        let base = work.path.parent().unwrap().to_owned();
        let allowed = work.path.join("data/sub");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::write(allowed.join("public.txt"), "public data\n").unwrap();
        let secret = base.join("secret/sub");
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(secret.join("credentials"), "orchestrator-secret-5d1f\n").unwrap();
        for p in [
            work.path.join("data"),
            allowed.clone(),
            allowed.join("public.txt"),
            base.join("secret"),
            secret.clone(),
            secret.join("credentials"),
        ] {
            std::os::unix::fs::chown(&p, Some(PRINCIPAL_UID), Some(PRINCIPAL_UID)).unwrap();
        }
        let socket = base.join("broker.sock");
        let data = work.path.join("data");
        let aim = if via_oldroot {
            Path::new("/oldroot").join(base.join("secret").strip_prefix("/").unwrap())
        } else {
            base.join("secret")
        };
        let broker = fake_broker(&socket, move || {
            std::fs::rename(&data, data.with_extension("orig")).unwrap();
            std::os::unix::fs::symlink(&aim, &data).unwrap();
        });
        let read = format!("cat {}/*", allowed.display());
        let mut cmd = Command::new(binary("agent-shim"));
        cmd.env_clear()
            .env("PATH", PATH)
            .env("KEYWARD_SOCKET", &socket)
            .env("KEYWARD_TOKEN", "kw1.stand-in")
            .args(["run", "--allow-read"])
            .arg(&allowed);
        if fallback {
            cmd.env("KEYWARD_TEST_NO_USERNS", "1");
        } else {
            cmd.arg("--require-namespaces");
        }
        let ran = Ran::from(
            cmd.args(["--", "/bin/sh", "-c", &read])
                .current_dir("/")
                .stdin(Stdio::null())
                .uid(PRINCIPAL_UID)
                .gid(PRINCIPAL_UID)
                .output()
                .unwrap(),
        );
        broker.join().unwrap();
        let case = format!("fallback={fallback} via_oldroot={via_oldroot}");
        assert!(
            std::fs::symlink_metadata(work.path.join("data"))
                .unwrap()
                .file_type()
                .is_symlink(),
            "{case}"
        );
        assert!(
            !ran.stdout.contains("orchestrator-secret"),
            "{case}: {ran:?}"
        );
        assert_ne!(ran.code, Some(0), "{case}: {ran:?}");
        let why = if fallback {
            "a component is a symbolic link now"
        } else if via_oldroot {
            "No such file or directory"
        } else {
            "a component was replaced by a symbolic link"
        };
        assert!(
            ran.stderr.contains(&allowed.display().to_string()) && ran.stderr.contains(why),
            "{case}: {ran:?}"
        );
    }
}

/// A stand-in broker on `path` for one connection: it answers `Hello`,
/// and `Bind` with `Bound` after running `before_bound`.
fn fake_broker(
    path: &Path,
    before_bound: impl FnOnce() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    use keyward_proto::token::TokenId;
    use keyward_proto::{decode, encode, Bound, Hello, Request, Response};
    use nix::sys::socket::{
        accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(listener.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&listener, Backlog::new(1).unwrap()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::thread::spawn(move || {
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(accept(listener.as_raw_fd()).unwrap()) };
        let mut buf = vec![0u8; 70_000];
        let mut next = || -> Request {
            let n = nix::unistd::read(&conn, &mut buf).unwrap();
            decode(&buf[..n]).unwrap()
        };
        assert!(matches!(next(), Request::Hello(_)));
        let hello = Response::Hello(Hello {
            version: keyward_proto::PROTOCOL_VERSION,
        });
        nix::unistd::write(&conn, &encode(&hello).unwrap()).unwrap();
        assert!(matches!(next(), Request::Bind(_)));
        before_bound();
        let bound = Response::Bound(Bound {
            id: TokenId([7; 16]),
            task: [0; 32],
            expires: u64::MAX,
        });
        nix::unistd::write(&conn, &encode(&bound).unwrap()).unwrap();
    })
}

/// Fallback mode's private directory is removed even when the shim is
/// killed by `SIGKILL` while the program runs: the reaper, which kills
/// what is left of the sandbox, removes it.
#[test]
fn the_fallback_directory_goes_even_when_the_shim_is_killed() {
    use std::io::BufRead;
    require_root();
    let work = Work::new();
    let mut shim = Command::new(binary("agent-shim"))
        .env_clear()
        .env("PATH", PATH)
        .env("KEYWARD_TEST_NO_USERNS", "1")
        .args(["run", "--allow-write"])
        .arg(&work.path)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "echo x > \"$TMPDIR/f\"; echo TMPDIR=$TMPDIR; exec sleep 60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .uid(PRINCIPAL_UID)
        .gid(PRINCIPAL_UID)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(shim.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let tmpdir = PathBuf::from(value(&line, "TMPDIR"));
    assert!(tmpdir.join("f").exists(), "{line:?}");
    shim.kill().unwrap();
    shim.wait().unwrap();
    for _ in 0..200 {
        if !tmpdir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("{} outlived the killed shim", tmpdir.display());
}
