// SPDX-License-Identifier: Apache-2.0
//! The `agent-shim` command line: parses arguments, calls the rest of the
//! library, prints the result. (The binary is only [`main`].)
//!
//! Exit status: 0 on success, 3 when the broker denied the call (the reason
//! on stderr in one sentence), 1 on any other error.

use std::io::Write;
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Parser, Subcommand};
use zeroize::Zeroize as _;

use crate::client::{socket_path, Client, ClientError, KEYWARD_FD_ENV};
use crate::grant::{attenuate_request, mint_request, ConstraintArgs};
use crate::sandbox::{read_token, Token, TokenSource};
use keyward_proto::{CallResult, Request, Response, ToolInfo};

const EXIT_ERROR: u8 = 1;
const EXIT_DENIED: u8 = 3;

/// agent-shim is how sub-agents reach the keyward broker: the broker holds
/// the credentials and performs calls; the shim only ever sees results.
///
/// The broker socket is $KEYWARD_SOCKET, or /run/keyward/broker.sock.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask the broker to perform TOOL with the given parameters, and print
    /// the response body on stdout.
    ///
    /// Exit status: 0 on success, 3 if the broker denied the call (the
    /// reason is printed on stderr), 1 on any other error, including an
    /// upstream HTTP status of 400 or more (the body is still printed).
    Call {
        /// Print a JSON envelope {"status", "headers", "body"} instead of
        /// the bare body (a non-UTF-8 body is given as "body_base64").
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        token: TokenArg,
        /// The tool to call, as named in the broker's policy.
        tool: String,
        /// Parameters as NAME=VALUE; the broker checks each against the
        /// tool's policy.
        #[arg(value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// Mint a token for a sub-agent and print it on stdout (its id and
    /// expiry go to stderr). Only a principal may mint, only for tools in
    /// its may_delegate, within each tool's policy and the TTL cap.
    Mint {
        /// A tool the token may call (repeatable); every constraint
        /// applies to each.
        #[arg(long = "tool", required = true)]
        tools: Vec<String>,
        #[command(flatten)]
        constraints: ConstraintArgs,
        /// The uid that may present the token (default: yours).
        #[arg(long)]
        for_uid: Option<u32>,
        /// Also require this gid of the presenter.
        #[arg(long, requires = "for_uid")]
        for_gid: Option<u32>,
        /// Make the token good for exactly the one call its --param values
        /// spell out (every parameter pinned).
        #[arg(long)]
        exact_call: bool,
    },
    /// Ask the broker for a strict subset of a token (fewer tools, more
    /// constraints, shorter life, fewer uses) and print it. Anything wider
    /// is refused with the reason.
    Attenuate {
        #[command(flatten)]
        token: TokenArg,
        /// Keep only these tools (default: all of the token's).
        #[arg(long = "tool")]
        tools: Vec<String>,
        #[command(flatten)]
        constraints: ConstraintArgs,
    },
    /// List the tools you (or the token) may call, with their constraints.
    Tools {
        /// Print JSON instead of a table.
        #[arg(long, conflicts_with = "json_schema")]
        json: bool,
        /// Print each tool's name, description and input JSON Schema (as
        /// `agent-shim mcp` lists them).
        #[arg(long)]
        json_schema: bool,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Serve the tools you (or the token) may call as a Model Context
    /// Protocol server on stdin/stdout, until stdin closes.
    ///
    /// `tools/list` gives each tool an input JSON Schema built from the
    /// policy and narrowed by the token; `tools/call` has the broker
    /// perform the call and returns the body, or the denial as an error
    /// result. Inside `agent-shim run` it uses the bound session
    /// ($KEYWARD_FD); elsewhere it binds the token, or acts as the
    /// calling principal without one.
    Mcp {
        #[command(flatten)]
        token: TokenArg,
    },
    /// Run CMD in a sandbox whose only way to the broker is a connection
    /// bound to a token.
    ///
    /// The shim connects to the broker and binds the token (from --token,
    /// --token-file or $KEYWARD_TOKEN); then, where unprivileged user
    /// namespaces work, it starts CMD in new user, mount, pid, IPC, UTS and
    /// cgroup namespaces, under a minimal read-only root (system
    /// directories; --allow-read and --allow-exec read-only; --allow-write
    /// read-write; a private /tmp, a fresh /proc, a minimal /dev), as pid 2
    /// under an init that dies with the shim. Elsewhere (fallback, said
    /// once on stderr; refused with --require-namespaces) a reaper kills
    /// everything CMD started when CMD exits or the shim dies.
    ///
    /// In both modes: a new session, every descriptor closed but 0-2 and
    /// the bound broker channel as fd 3 ($KEYWARD_FD=3; without a token
    /// there is no channel), an environment cleared to a short allowlist
    /// plus --keep-env names (never $KEYWARD_TOKEN), no core dumps, the
    /// resource limits, no_new_privs, Landlock (read+exec on system
    /// directories, read on --allow-read, read+write on --allow-write,
    /// read+exec on --allow-exec and on CMD itself, nothing else; no TCP;
    /// no signals or abstract sockets outside the sandbox), and a seccomp
    /// filter that forbids new sockets, io_uring, ptrace, namespaces,
    /// mounts, SysV IPC, acting on other pids, terminal changes (unless
    /// --tty) and foreign architectures (in fallback mode also path-based
    /// chmod/chown/xattr/utimes and inotify). Inside, `agent-shim call`
    /// reaches the broker through fd 3.
    ///
    /// Refuses to run where the kernel cannot enforce the file rules,
    /// unless --allow-unsandboxed is given.
    ///
    /// Exit status: CMD's status, or 128+N if signal N killed it; 3 if the
    /// broker refused the token; 125 if the sandbox could not be set up;
    /// 126 if CMD could not be executed; 127 if CMD was not found; 1 on any
    /// other error.
    Run {
        /// The token to bind. Visible to other processes until the shim
        /// overwrites it in its command line: prefer --token-file or
        /// $KEYWARD_TOKEN.
        #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
        token: Option<String>,
        /// Read the token to bind from FILE.
        #[arg(long, value_name = "FILE")]
        token_file: Option<std::path::PathBuf>,
        /// Allow reading PATH (a file or a directory tree).
        #[arg(long, value_name = "PATH")]
        allow_read: Vec<std::path::PathBuf>,
        /// Allow reading and writing PATH (a file or a directory tree).
        #[arg(long, value_name = "PATH")]
        allow_write: Vec<std::path::PathBuf>,
        /// Allow reading and executing PATH (a file or a directory tree).
        #[arg(long, value_name = "PATH")]
        allow_exec: Vec<std::path::PathBuf>,
        /// Pass the environment variable NAME on to CMD.
        #[arg(long, value_name = "NAME")]
        keep_env: Vec<String>,
        /// Run even where the kernel cannot enforce the sandbox (with a
        /// warning naming what is missing).
        #[arg(long)]
        allow_unsandboxed: bool,
        /// Refuse to run where user namespaces are unavailable, instead of
        /// falling back to Landlock and seccomp alone.
        #[arg(long)]
        require_namespaces: bool,
        /// Share the terminal: CMD may change its settings (raw mode,
        /// window size). Typing into it (TIOCSTI) stays denied.
        #[arg(long)]
        tty: bool,
        /// Give CMD the broker's HTTP gateway NAME (a `[[gateway]]` the
        /// token grants; repeatable). CMD gets a private network namespace
        /// with only loopback, where an endpoint on 127.0.0.1 relays each
        /// HTTP request to the broker (which checks it, adds the real
        /// credential and streams the answer back); the gateway's variables
        /// (e.g. OPENAI_BASE_URL) point at it and its key variables (e.g.
        /// OPENAI_API_KEY) hold a placeholder that is not a secret. CMD may
        /// open TCP connections to that endpoint and nowhere else. Needs
        /// user namespaces: refused in fallback mode.
        #[arg(long, value_name = "NAME")]
        gateway: Vec<String>,
        /// Data (heap, private mappings) per process, e.g. 512M, 4G
        /// (RLIMIT_DATA).
        #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "16G")]
        memory: u64,
        /// Processes and threads in the sandbox (RLIMIT_NPROC).
        #[arg(long, value_name = "N", default_value_t = 4096)]
        pids: u64,
        /// CPU time per process, e.g. 30m, 2h (RLIMIT_CPU).
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds, default_value = "24h")]
        cpu_time: u64,
        /// Largest file a process may write, e.g. 1G (RLIMIT_FSIZE).
        #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64G")]
        max_file_size: u64,
        /// Print what the sandbox enforces on stderr before running CMD.
        #[arg(long, short)]
        verbose: bool,
        /// The program to run and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
    },
}

/// `N`, `NK`, `NM`, `NG` or `NT` (powers of 1024).
fn parse_size(arg: &str) -> Result<u64, String> {
    let (digits, shift) = match arg.char_indices().last() {
        Some((i, 'K' | 'k')) => (&arg[..i], 10),
        Some((i, 'M' | 'm')) => (&arg[..i], 20),
        Some((i, 'G' | 'g')) => (&arg[..i], 30),
        Some((i, 'T' | 't')) => (&arg[..i], 40),
        _ => (arg, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{arg:?} is not a size such as 512M or 4G"))
}

/// A duration such as `90s`, `30m` or `2h`, in whole seconds.
fn parse_seconds(arg: &str) -> Result<u64, String> {
    humantime::parse_duration(arg)
        .ok()
        .map(|d| d.as_secs())
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("{arg:?} is not a duration such as 30m or 2h"))
}

fn parse_param(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("parameter {arg:?} is not of the form NAME=VALUE")),
    }
}

/// `--token`, falling back to `$KEYWARD_TOKEN`. (Prefer the variable: a
/// command line is visible to every process on the host.)
#[derive(clap::Args, Debug, Default)]
struct TokenArg {
    /// The capability token to act with (default: $KEYWARD_TOKEN).
    #[arg(long = "token", value_name = "TOKEN")]
    token: Option<String>,
}

impl TokenArg {
    /// The token, by the same rules as `run`: `--token` is overwritten in
    /// the command line, and an empty or non-UTF-8 value is an error.
    fn get(mut self) -> Result<Option<Token>, String> {
        let source = match self.token.take() {
            Some(t) => TokenSource::Arg(t),
            None => TokenSource::Env,
        };
        let token = read_token(&source).map_err(|e| e.to_string());
        if let TokenSource::Arg(mut t) = source {
            t.zeroize();
        }
        token
    }
}

/// Parse the command line, act, and give the exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Call {
            json,
            token,
            tool,
            params,
        } => match token.get() {
            Ok(token) => call(token.as_ref(), &tool, &params, json),
            Err(e) => fail(&e),
        },
        Command::Mint {
            tools,
            constraints,
            for_uid,
            for_gid,
            exact_call,
        } => match mint_request(&tools, &constraints, for_uid, for_gid, exact_call) {
            Ok(mint) => issue(None, &Request::Mint(mint)),
            Err(e) => fail(&e.to_string()),
        },
        Command::Attenuate {
            token,
            tools,
            constraints,
        } => match attenuate_request(&tools, &constraints) {
            Err(e) => fail(&e.to_string()),
            Ok(req) => match token.get() {
                Ok(token) => issue(token.as_ref(), &Request::Attenuate(req)),
                Err(e) => fail(&e),
            },
        },
        Command::Tools {
            json,
            json_schema,
            token,
        } => match token.get() {
            Ok(token) => tools(token.as_ref(), json, json_schema),
            Err(e) => fail(&e),
        },
        Command::Mcp { token } => match token.get() {
            Ok(token) => mcp(token.as_ref()),
            Err(e) => fail(&e),
        },
        Command::Run {
            token,
            token_file,
            allow_read,
            allow_write,
            allow_exec,
            keep_env,
            allow_unsandboxed,
            require_namespaces,
            tty,
            gateway,
            memory,
            pids,
            cpu_time,
            max_file_size,
            verbose,
            command,
        } => run(&crate::sandbox::RunOptions {
            token: match (token, token_file) {
                (Some(token), _) => crate::sandbox::TokenSource::Arg(token),
                (None, Some(file)) => crate::sandbox::TokenSource::File(file),
                (None, None) => crate::sandbox::TokenSource::Env,
            },
            allow_read,
            allow_write,
            allow_exec,
            keep_env,
            allow_unsandboxed,
            require_namespaces,
            tty,
            gateways: gateway,
            limits: crate::sandbox::Limits {
                memory,
                pids,
                cpu_time,
                max_file_size,
            },
            verbose,
            command,
        }),
    }
}

fn run(options: &crate::sandbox::RunOptions) -> ExitCode {
    match crate::sandbox::run(options) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("agent-shim: run: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("agent-shim: {message}");
    ExitCode::from(EXIT_ERROR)
}

/// A connection to the broker acting with the right authority: inside
/// `agent-shim run`, a channel of the bound session ($KEYWARD_FD); else a
/// new connection, bound to `token` when one is given. A refused bind
/// comes back as the broker's `Denied` response.
fn connect(token: Option<&Token>) -> Result<Result<Client, Response>, ClientError> {
    if std::env::var_os(KEYWARD_FD_ENV).is_some() {
        return crate::client::from_env_or_socket().map(Ok);
    }
    let mut client = Client::connect(&socket_path())?;
    if let Some(token) = token {
        if let Err(refused) = client.bind(token.expose())? {
            return Ok(Err(refused));
        }
    }
    Ok(Ok(client))
}

/// Send one request with the right authority and return the reply.
fn exchange(token: Option<&Token>, request: &Request) -> Result<Response, ClientError> {
    match connect(token)? {
        Ok(mut client) => client.request(request),
        Err(refused) => Ok(refused),
    }
}

/// `mint` and `attenuate`: print the new token.
fn issue(token: Option<&Token>, request: &Request) -> ExitCode {
    match exchange(token, request) {
        Ok(Response::Minted(minted)) => {
            println!("{}", minted.token);
            eprintln!(
                "agent-shim: token {} expires at {} (unix time)",
                minted.id, minted.expires
            );
            ExitCode::SUCCESS
        }
        other => report_failure(other, false),
    }
}

/// `mcp`: serve until stdin closes.
fn mcp(token: Option<&Token>) -> ExitCode {
    let client = match connect(token) {
        Ok(Ok(client)) => client,
        Ok(Err(refused)) => return report_failure(Ok(refused), false),
        Err(e) => return report_failure(Err(e), false),
    };
    match crate::mcp::serve_stdio(client) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("mcp: {e}")),
    }
}

fn tools(token: Option<&Token>, json: bool, json_schema: bool) -> ExitCode {
    match exchange(token, &Request::Tools) {
        Ok(Response::ToolList(list)) => {
            if json_schema {
                print_json(&crate::schema::tools_json(&list.tools));
            } else if json {
                print_json(&serde_json::Value::Array(
                    list.tools.iter().map(tool_json).collect(),
                ));
            } else {
                print_tool_table(&list.tools);
            }
            ExitCode::SUCCESS
        }
        other => report_failure(other, false),
    }
}

fn tool_json(tool: &ToolInfo) -> serde_json::Value {
    serde_json::json!({
        "name": tool.name,
        "description": tool.description,
        "params": tool.params.iter().map(|p| serde_json::json!({
            "name": p.name,
            "type": p.ty,
            "required": p.required,
            "rules": p.rules,
        })).collect::<Vec<_>>(),
    })
}

fn print_tool_table(tools: &[ToolInfo]) {
    println!("{:<20} {:<16} {:<8} RULES", "TOOL", "PARAMETER", "TYPE");
    for tool in tools {
        if tool.params.is_empty() {
            println!("{:<20} {:<16} {:<8} -", tool.name, "-", "-");
        }
        for p in &tool.params {
            let mut rules = p.rules.join("; ");
            if !p.required {
                rules = if rules.is_empty() {
                    "optional".into()
                } else {
                    format!("optional; {rules}")
                };
            }
            println!("{:<20} {:<16} {:<8} {}", tool.name, p.name, p.ty, rules);
        }
    }
}

fn call(token: Option<&Token>, tool: &str, params: &[(String, String)], json: bool) -> ExitCode {
    let response = connect(token).and_then(|client| match client {
        Ok(mut c) => c.call(tool, params),
        Err(refused) => Ok(refused),
    });
    match response {
        Ok(Response::Done(result)) => print_result(&result, json),
        other => report_failure(other, json),
    }
}

/// Anything but the hoped-for reply: a denial (exit 3) or an error (1).
fn report_failure(response: Result<Response, ClientError>, json: bool) -> ExitCode {
    match response {
        Ok(Response::Denied(denial)) => {
            if json {
                print_json(&serde_json::json!({ "denied": denial.reason }));
            }
            eprintln!("agent-shim: {}", denial.reason);
            ExitCode::from(EXIT_DENIED)
        }
        Ok(Response::Error(e)) => {
            eprintln!("agent-shim: broker error ({:?}): {}", e.code, e.message);
            ExitCode::from(EXIT_ERROR)
        }
        Ok(other) => {
            eprintln!("agent-shim: unexpected reply from the broker: {other:?}");
            ExitCode::from(EXIT_ERROR)
        }
        Err(e) => {
            eprintln!("agent-shim: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn print_result(result: &CallResult, json: bool) -> ExitCode {
    if json {
        let headers: Vec<_> = result
            .headers
            .iter()
            .map(|h| serde_json::json!([h.name, h.value]))
            .collect();
        let mut envelope = serde_json::json!({ "status": result.status, "headers": headers });
        match std::str::from_utf8(&result.body) {
            Ok(text) => envelope["body"] = text.into(),
            Err(_) => {
                envelope["body_base64"] = base64::engine::general_purpose::STANDARD
                    .encode(&result.body)
                    .into()
            }
        }
        print_json(&envelope);
    } else {
        let mut out = std::io::stdout().lock();
        if out
            .write_all(&result.body)
            .and_then(|()| out.flush())
            .is_err()
        {
            return ExitCode::from(EXIT_ERROR);
        }
    }
    if result.status >= 400 {
        eprintln!(
            "agent-shim: upstream answered with status {}",
            result.status
        );
        return ExitCode::from(EXIT_ERROR);
    }
    ExitCode::SUCCESS
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}
