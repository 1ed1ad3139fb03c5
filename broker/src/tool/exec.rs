// SPDX-License-Identifier: Apache-2.0
//! `kind = "exec"`: run a fixed program with a fixed argv template, the
//! credential in the child's environment (or in a private file it names).
//!
//! ```toml
//! [[tool]]
//! name = "git_ls_remote"
//! kind = "exec"
//! credential = "github"
//! program = "/usr/bin/git"                  # absolute; never looked up in PATH
//! args = ["ls-remote", "--heads", "--", "{repo}"]
//! credential_env = "GIT_TOKEN"              # or credential_file_env
//! env = { GIT_TERMINAL_PROMPT = "0" }
//! timeout = "30s"
//! params.repo = { type = "string", pattern = '^https://github\.com/[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$' }
//! ```
//!
//! What a caller controls is data, never code: no shell runs; an `args`
//! element is either fixed text or exactly one `{param}`, which becomes
//! exactly one argv element whatever it contains (no splitting, no
//! globbing, no expansion); a value that starts with `-` is refused unless
//! the template puts it after a fixed `--`, so it cannot become an option.
//!
//! The child runs as the broker's uid with a clean environment (only the
//! tool's `env` and the credential), stdin from `/dev/null`, no inherited
//! descriptor above 2 (`close_range(CLOSE_RANGE_CLOEXEC)`), `no_new_privs`,
//! in its own process group. When the program exits, at the timeout, when
//! its output passes the cap, or when the call is abandoned, the whole
//! group is killed (while the leader is still unreaped, so its id cannot
//! have been reused). With `credential_file_env`, the credential is in a
//! 0600 file created for the call and removed after it.
//!
//! The reply ([`keyward_proto::CallResult`], no protocol change): `status`
//! 200 when the program exited 0, else 502; header `content-type:
//! application/json`; body `{"exit_code": N|null, "signal": N|null,
//! "stdout": "...", "stderr": "..."}` (output as UTF-8, invalid bytes
//! replaced). Output is judged by the leak scanner before anything is
//! built from it: any credential material in stdout or stderr, in any
//! encoding the scanner reads, and the reply is withheld whole (no
//! redaction: the program holds the credential, so an echo of it is a
//! leak, not an upstream's reflection).
//!
//! The exit code and the signal are returned as they are, not judged: a
//! number of 0–255 holds no window. They are a channel only for a program
//! that computes them from its credential (a byte per call, chosen by a
//! parameter); an honest program's code says how it ended. A program that
//! does that can as well XOR or encrypt its stdout, pad it to a length, or
//! time its exit, which no scanner sees, and the status the reply must
//! carry (200 or 502) is already a one-bit oracle that restricting codes to
//! a declared set would not remove. The scanner stops echoes; against a
//! program that colludes, the defence is the admin's choice of program and
//! argv template.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use keyward_proto::{CallResult, Header};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use zeroize::Zeroizing;

use super::{off_reactor, Action, Context, Definition, ExecError, Invocation, Kind, Running};
use crate::config::duration_opt;
use crate::credential::Credentials;
use crate::param::TypedValue;
use crate::tool::http::MAX_RESPONSE_CAP;

pub const KIND: Kind = Kind {
    name: "exec",
    compile: compile_action,
};

/// The fields `kind = "exec"` adds to a `[[tool]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecFields {
    /// Absolute path of the program; never looked up in `PATH`.
    pub program: Option<PathBuf>,
    /// argv after the program: fixed text, or exactly `{param}`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variable that carries the credential's value.
    pub credential_env: Option<String>,
    /// Environment variable that carries the path of a 0600 file holding
    /// the credential, living as long as the call.
    pub credential_file_env: Option<String>,
    /// Fixed environment of the child (nothing else is inherited).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<Duration>,
    /// Cap on stdout and stderr together, in bytes.
    pub max_output_bytes: Option<usize>,
}

/// A compiled `kind = "exec"` tool.
#[derive(Debug)]
pub struct ExecTool {
    program: PathBuf,
    args: Vec<Arg>,
    credential: Option<(String, Place)>,
    env: Vec<(String, String)>,
    timeout: Duration,
    max_output_bytes: usize,
}

/// One argv element of the template.
#[derive(Debug)]
enum Arg {
    Fixed(String),
    /// A parameter's value, whole. `after_dashdash`: a fixed `--` comes
    /// before it, so a value starting with `-` is an operand.
    Param {
        name: String,
        after_dashdash: bool,
    },
}

/// Where the credential goes.
#[derive(Debug)]
enum Place {
    Env(String),
    FileEnv(String),
}

fn compile_action(def: &Definition<'_>) -> Result<Box<dyn Action>, Vec<String>> {
    let fields = def.fields::<ExecFields>()?;
    ExecTool::compile(def, &fields).map(|tool| Box::new(tool) as Box<dyn Action>)
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`
fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl ExecTool {
    /// Compile the exec fields of a tool. Errors are messages relative to
    /// the tool (e.g. `args[2]: placeholder {x} names no parameter`).
    pub fn compile(def: &Definition<'_>, fields: &ExecFields) -> Result<ExecTool, Vec<String>> {
        let mut errors = Vec::new();

        let program = match &fields.program {
            None => {
                errors.push("program: is required for an exec tool".to_owned());
                None
            }
            Some(p) if !p.is_absolute() => {
                errors.push(format!(
                    "program: {:?} is not an absolute path (PATH is never searched)",
                    p.display()
                ));
                None
            }
            Some(p) if p.as_os_str().as_bytes().contains(&0) => {
                errors.push("program: contains a NUL byte".to_owned());
                None
            }
            Some(p) => Some(p.clone()),
        };

        let mut args = Vec::new();
        let mut after_dashdash = false;
        for (i, text) in fields.args.iter().enumerate() {
            let placeholder = text
                .strip_prefix('{')
                .and_then(|rest| rest.strip_suffix('}'))
                .filter(|name| !name.contains(['{', '}']));
            match placeholder {
                Some(name) if def.params.contains_key(name) => args.push(Arg::Param {
                    name: name.to_owned(),
                    after_dashdash,
                }),
                Some(name) => errors.push(format!(
                    "args[{i}]: placeholder {{{name}}} names no parameter"
                )),
                None if text.contains(['{', '}']) => errors.push(format!(
                    "args[{i}]: a placeholder must be a whole argv element (\"{{name}}\"), \
                     and fixed text cannot contain {{ or }}"
                )),
                None if text.contains('\0') => {
                    errors.push(format!("args[{i}]: contains a NUL byte"))
                }
                None => {
                    after_dashdash |= text == "--";
                    args.push(Arg::Fixed(text.clone()));
                }
            }
        }

        let mut env = Vec::new();
        for (name, value) in &fields.env {
            if !valid_env_name(name) {
                errors.push(format!(
                    "env.{name}: not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
                ));
            } else if value.contains('\0') {
                errors.push(format!("env.{name}: contains a NUL byte"));
            } else {
                env.push((name.clone(), value.clone()));
            }
        }

        let place = match (&fields.credential_env, &fields.credential_file_env) {
            (Some(_), Some(_)) => {
                errors.push(
                    "credential_env: set credential_env or credential_file_env, not both"
                        .to_owned(),
                );
                None
            }
            (Some(name), None) => Some(("credential_env", Place::Env(name.clone()), name)),
            (None, Some(name)) => Some(("credential_file_env", Place::FileEnv(name.clone()), name)),
            (None, None) => None,
        };
        let credential = match (def.credential, place) {
            (None, None) => None,
            (Some(credential), None) => {
                errors.push(format!(
                    "credential: {credential} is set but neither credential_env nor \
                     credential_file_env says where the program gets it"
                ));
                None
            }
            (None, Some((field, _, _))) => {
                errors.push(format!(
                    "{field}: needs a credential (credential = \"NAME\")"
                ));
                None
            }
            (Some(credential), Some((field, place, name))) => {
                if !valid_env_name(name) {
                    errors.push(format!(
                        "{field}: {name:?} is not a valid environment variable name"
                    ));
                } else if fields.env.contains_key(name) {
                    errors.push(format!("{field}: {name} is also set in env"));
                }
                Some((credential.to_owned(), place))
            }
        };

        let timeout = fields.timeout.unwrap_or(def.defaults.timeout);
        if timeout.is_zero() {
            errors.push("timeout: must be longer than zero".to_owned());
        }
        let max_output_bytes = fields
            .max_output_bytes
            .unwrap_or(def.defaults.max_response_bytes);
        if max_output_bytes == 0 || max_output_bytes > MAX_RESPONSE_CAP {
            errors.push(format!(
                "max_output_bytes: {max_output_bytes} is not between 1 and {MAX_RESPONSE_CAP}"
            ));
        }

        match program {
            Some(program) if errors.is_empty() => Ok(ExecTool {
                program,
                args,
                credential,
                env,
                timeout,
                max_output_bytes,
            }),
            _ => Err(errors),
        }
    }

    /// argv after the program, each parameter one element.
    fn render_args(&self, call: Invocation<'_>) -> Result<Vec<String>, ExecError> {
        let mut argv = Vec::with_capacity(self.args.len());
        for arg in &self.args {
            match arg {
                Arg::Fixed(text) => argv.push(text.clone()),
                Arg::Param {
                    name,
                    after_dashdash,
                } => {
                    let text = call
                        .params
                        .get(name)
                        .map(TypedValue::to_text)
                        .ok_or_else(|| {
                            ExecError::Internal(format!(
                                "parameter {name:?} of tool {} has no value",
                                call.tool
                            ))
                        })?;
                    if text.contains('\0') {
                        return Err(ExecError::Rejected(format!(
                            "call denied: parameter {name:?} of tool {} contains a NUL byte",
                            call.tool
                        )));
                    }
                    if text.starts_with('-') && !after_dashdash {
                        return Err(ExecError::Rejected(format!(
                            "call denied: parameter {name:?} of tool {} starts with \"-\" and \
                             the tool's args do not place it after \"--\", so the program \
                             would read it as an option",
                            call.tool
                        )));
                    }
                    argv.push(text);
                }
            }
        }
        Ok(argv)
    }

    async fn execute(
        &self,
        call: Invocation<'_>,
        credentials: &Credentials,
    ) -> Result<CallResult, ExecError> {
        let argv = self.render_args(call)?;
        let mut command = Command::new(&self.program);
        command
            .args(&argv)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        crate::sys::harden_child(&mut command);

        // Lives as long as the call: removed when dropped, after the child
        // and its group are gone.
        let mut _credential_file = None;
        if let Some((name, place)) = &self.credential {
            let secret = credentials
                .get(name)
                .ok_or_else(|| ExecError::Internal(format!("credential {name} is not loaded")))?;
            match place {
                Place::Env(var) => {
                    if secret.expose().contains(&0) {
                        return Err(ExecError::Internal(format!(
                            "credential {name} cannot be placed in the environment (it contains a NUL byte)"
                        )));
                    }
                    command.env(var, OsStr::from_bytes(secret.expose()));
                }
                Place::FileEnv(var) => {
                    let file = credential_file(secret.expose()).map_err(|e| {
                        ExecError::Internal(format!("cannot write the credential file: {e}"))
                    })?;
                    command.env(var, file.path());
                    _credential_file = Some(file);
                }
            }
        }

        let child = command.spawn().map_err(|e| {
            ExecError::Upstream(format!("cannot start {}: {e}", self.program.display()))
        })?;
        let mut group = Group::new(child)?;
        let outcome =
            tokio::time::timeout(self.timeout, group.collect(self.max_output_bytes)).await;
        // Whatever happened: the leader is not reaped yet, so its id still
        // names this group; every process left in it dies now.
        group.kill();
        let status = group.reap().await;
        let (stdout, stderr) = match outcome {
            Err(_) => return Err(ExecError::Timeout(self.timeout)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(output)) => output,
        };
        let status = status?;
        drop(_credential_file);

        off_reactor(|| {
            let scanner = credentials.scanner();
            scanner.check(&stdout)?;
            scanner.check(&stderr)
        })
        .map_err(ExecError::Withheld)?;

        let body = serde_json::json!({
            "exit_code": status.code(),
            "signal": status.signal(),
            "stdout": String::from_utf8_lossy(&stdout),
            "stderr": String::from_utf8_lossy(&stderr),
        })
        .to_string()
        .into_bytes();
        if body.len() > MAX_RESPONSE_CAP {
            return Err(ExecError::TooLarge(self.max_output_bytes));
        }
        Ok(CallResult {
            status: if status.success() { 200 } else { 502 },
            headers: vec![Header {
                name: "content-type".to_owned(),
                value: "application/json".to_owned(),
            }],
            body,
        })
    }
}

impl Action for ExecTool {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn run<'a>(&'a self, call: Invocation<'a>, context: Context<'a>) -> Running<'a> {
        Box::pin(self.execute(call, context.credentials))
    }
}

/// A 0600 file holding `secret`, created exclusively; removed on drop.
fn credential_file(secret: &[u8]) -> std::io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
        .unwrap_or_else(std::env::temp_dir);
    let mut file = tempfile::Builder::new()
        .prefix("keyward-credential-")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    file.write_all(secret)?;
    file.flush()?;
    Ok(file)
}

/// A running child, leader of its own process group. Dropped unreaped
/// (the call abandoned), it kills the group first.
struct Group {
    child: Child,
    pgid: Pid,
    /// Readable when the leader has exited (it stays unreaped).
    exited: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    reaped: bool,
}

impl Group {
    fn new(child: Child) -> Result<Group, ExecError> {
        let mut child = child;
        let internal = |what: &str, e: std::io::Error| {
            ExecError::Internal(format!("cannot watch the child ({what}): {e}"))
        };
        let Some(pid) = child.id() else {
            return Err(ExecError::Internal("the child has no pid".to_owned()));
        };
        let pid =
            i32::try_from(pid).map_err(|_| ExecError::Internal("pid out of range".to_owned()))?;
        let pgid = Pid::from_raw(pid);
        let exited = crate::sys::pidfd_open(pid)
            .and_then(|fd| crate::sys::register(fd, tokio::io::Interest::READABLE))
            .map_err(|e| {
                // Not reaped yet: the group is still ours to kill.
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = child.start_kill();
                internal("pidfd", e)
            })?;
        Ok(Group {
            child,
            pgid,
            exited,
            reaped: false,
        })
    }

    /// stdout and stderr, each read while the leader runs; when it exits,
    /// the rest of its group is killed so the pipes close. Together at
    /// most `cap` bytes, else [`ExecError::TooLarge`].
    async fn collect(
        &mut self,
        cap: usize,
    ) -> Result<(Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>), ExecError> {
        let stdout = self.child.stdout.take();
        let stderr = self.child.stderr.take();
        let pgid = self.pgid;
        let exited = &self.exited;
        let total = std::sync::atomic::AtomicUsize::new(0);
        let leader = async {
            // Readable once the leader exits; an error means the same here.
            let _ = exited.readable().await;
            let _ = killpg(pgid, Signal::SIGKILL);
            Ok::<(), ExecError>(())
        };
        let (out, err, ()) = tokio::try_join!(
            read_capped(stdout, cap, &total),
            read_capped(stderr, cap, &total),
            leader
        )?;
        Ok((out, err))
    }

    fn kill(&self) {
        if !self.reaped {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }

    async fn reap(&mut self) -> Result<std::process::ExitStatus, ExecError> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| ExecError::Internal(format!("cannot wait for the child: {e}")));
        self.reaped = true;
        status
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Read a pipe to its end, counting into `total` against `cap`. Sized once:
/// no reallocation leaves an unzeroized copy of output behind.
async fn read_capped(
    pipe: Option<impl AsyncRead + Unpin>,
    cap: usize,
    total: &std::sync::atomic::AtomicUsize,
) -> Result<Zeroizing<Vec<u8>>, ExecError> {
    use std::sync::atomic::Ordering;
    let Some(mut pipe) = pipe else {
        return Ok(Zeroizing::new(Vec::new()));
    };
    let mut buf = Zeroizing::new(vec![0u8; cap + 1]);
    let mut len = 0;
    loop {
        let Some(free) = buf.get_mut(len..) else {
            return Err(ExecError::TooLarge(cap));
        };
        let n = pipe
            .read(free)
            .await
            .map_err(|e| ExecError::Upstream(format!("cannot read the program's output: {e}")))?;
        if n == 0 {
            break;
        }
        len += n;
        if total.fetch_add(n, Ordering::Relaxed) + n > cap {
            return Err(ExecError::TooLarge(cap));
        }
    }
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{ParamType, ToolConfig};
    use crate::param::ParamSpec;
    use crate::tool::Defaults;

    fn compile(text: &str) -> Result<ExecTool, Vec<String>> {
        let config: ToolConfig =
            toml::from_str(&format!("name = \"t\"\nkind = \"exec\"\n{text}")).unwrap();
        let params: BTreeMap<String, ParamSpec> = config
            .params
            .keys()
            .map(|name| {
                let spec = ParamSpec {
                    ty: ParamType::String,
                    rules: Vec::new(),
                    default: None,
                    secret: false,
                };
                (name.clone(), spec)
            })
            .collect();
        let def = Definition {
            name: &config.name,
            kind: "exec",
            credential: config.credential.as_deref(),
            params: &params,
            fields: &config.fields,
            defaults: Defaults {
                timeout: Duration::from_secs(10),
                max_response_bytes: 60_000,
            },
        };
        ExecTool::compile(&def, &def.fields::<ExecFields>()?)
    }

    fn errors(text: &str) -> String {
        compile(text).unwrap_err().join("\n")
    }

    #[test]
    fn compiles_the_issue_example() {
        let tool = compile(
            r#"credential = "github"
program = "/usr/bin/git"
args = ["ls-remote", "--heads", "--", "{repo}"]
credential_env = "GIT_TOKEN"
env = { GIT_TERMINAL_PROMPT = "0" }
timeout = "30s"
params.repo = { type = "string" }"#,
        )
        .unwrap();
        assert_eq!(tool.timeout, Duration::from_secs(30));
        assert!(matches!(
            tool.args.last(),
            Some(Arg::Param {
                after_dashdash: true,
                ..
            })
        ));
    }

    #[test]
    fn compile_errors_name_their_field() {
        for (text, expected) in [
            ("", "program: is required"),
            ("program = \"git\"", "program: \"git\" is not an absolute path"),
            (
                "program = \"/bin/x\"\nargs = [\"--repo={repo}\"]\nparams.repo = { type = \"string\" }",
                "args[0]: a placeholder must be a whole argv element",
            ),
            (
                "program = \"/bin/x\"\nargs = [\"{nope}\"]",
                "args[0]: placeholder {nope} names no parameter",
            ),
            (
                "program = \"/bin/x\"\ncredential_env = \"T\"",
                "credential_env: needs a credential",
            ),
            (
                "program = \"/bin/x\"\ncredential = \"c\"",
                "credential: c is set but neither credential_env nor credential_file_env",
            ),
            (
                "program = \"/bin/x\"\ncredential = \"c\"\ncredential_env = \"T\"\ncredential_file_env = \"F\"",
                "credential_env: set credential_env or credential_file_env, not both",
            ),
            (
                "program = \"/bin/x\"\ncredential = \"c\"\ncredential_env = \"T\"\nenv = { T = \"x\" }",
                "credential_env: T is also set in env",
            ),
            ("program = \"/bin/x\"\nenv = { \"A=B\" = \"x\" }", "env.A=B: not a valid"),
            ("program = \"/bin/x\"\ntimeout = \"0s\"", "timeout: must be longer than zero"),
            ("program = \"/bin/x\"\ntimeout = 5", "timeout: invalid type: integer"),
            ("program = 3", "program: invalid type: integer"),
            (
                "program = \"/bin/x\"\nmax_output_bytes = 1000000",
                "max_output_bytes: 1000000 is not between",
            ),
            ("program = \"/bin/x\"\nurl = \"http://x\"", "url: not allowed for kind \"exec\""),
        ] {
            let found = errors(text);
            assert!(found.contains(expected), "{text:?}: {found}");
        }
    }

    #[test]
    fn dash_rule_follows_the_template() {
        let tool = compile(
            "program = \"/bin/x\"\nargs = [\"{a}\", \"--\", \"{b}\"]\nparams.a = { type = \"string\" }\nparams.b = { type = \"string\" }",
        )
        .unwrap();
        let params = |a: &str, b: &str| -> BTreeMap<String, TypedValue> {
            [("a", a), ("b", b)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), TypedValue::Str(v.to_owned())))
                .collect()
        };
        let call = |p: &BTreeMap<String, TypedValue>| {
            tool.render_args(Invocation {
                tool: "t",
                params: p,
            })
        };
        assert_eq!(call(&params("x y", "-b")).unwrap(), ["x y", "--", "-b"]);
        let err = call(&params("--upload-pack=evil", "b"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parameter \"a\" of tool t starts with \"-\""),
            "{err}"
        );
    }
}
