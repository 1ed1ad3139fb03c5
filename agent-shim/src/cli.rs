// SPDX-License-Identifier: Apache-2.0
//! The `agent-shim` command line: parses arguments, calls the rest of the
//! library, prints the result. (The binary is only [`main`].)
//!
//! Exit status: 0 on success, 3 when the broker denied the call (the reason
//! on stderr in one sentence), 1 on any other error.

use std::io::Write;
use std::process::ExitCode;

use base64::Engine as _;
use clap::{CommandFactory, Parser, Subcommand};
use zeroize::Zeroize as _;

use crate::client::{socket_path, Client, ClientError, KEYWARD_FD_ENV};
use crate::grant::{attenuate_request, mint_request, ConstraintArgs};
use crate::sandbox::{read_token, Token, TokenSource};
use crate::schema::value_json;
use keyward_proto::{CallResult, Request, Response, ToolInfo, ToolKind};

const EXIT_ERROR: u8 = 1;
const EXIT_DENIED: u8 = 3;

/// agent-shim is how sub-agents reach the keyward broker: the broker holds
/// the credentials and performs calls; the shim only ever sees results.
///
/// The broker socket is $KEYWARD_SOCKET, or /run/keyward/broker.sock.
#[derive(Parser, Debug)]
#[command(version, long_about)]
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
    /// List the tools you (or the token) may call, with their constraints,
    /// then the gateways you may reach (`gateway NAME: ...`; a program
    /// reaches one over HTTP through `agent-shim run --gateway NAME`).
    Tools {
        /// Print JSON instead of a table (each entry with its "kind":
        /// "tool" or "gateway").
        #[arg(long, conflicts_with = "json_schema")]
        json: bool,
        /// Print each tool's name, description and input JSON Schema (as
        /// `agent-shim mcp` lists them).
        #[arg(long)]
        json_schema: bool,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Print the task hash of a task description: the `KEYWARD_TASK` of
    /// every audit record of a token minted with `--task TEXT`, to query
    /// the journal by (`journalctl KEYWARD_TASK=HASH`).
    TaskHash {
        /// The task description, exactly as given to `mint --task`.
        task: String,
    },
    /// Work with tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Serve the tools you (or the token) may call as a Model Context
    /// Protocol server on stdin/stdout, until stdin closes.
    ///
    /// `tools/list` gives each tool an input JSON Schema built from the
    /// policy and narrowed by the token (gateways are not tools and are
    /// not listed); `tools/call` has the broker
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
        /// Let CMD open TCP connections to PORT on any address (repeatable),
        /// e.g. 443 for the S3 endpoint a `--derive`d credential is for.
        /// Landlock restricts connect by port only, so CMD can reach every
        /// host on that port: data it can read can leave by it (no
        /// credential of the broker can). Not with --gateway (whose network
        /// holds only loopback). Needs Landlock network rules (ABI 4).
        #[arg(long, value_name = "PORT")]
        allow_connect: Vec<u16>,
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
        /// Before CMD starts, call TOOL (a kind = "aws_sts" tool) with
        /// NAME=VALUE parameters over the bound connection and put the
        /// short-lived AWS credentials it returns in CMD's environment only:
        /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
        /// AWS_REGION (and AWS_DEFAULT_REGION), and AWS_ENDPOINT_URL when
        /// the credential has an endpoint.
        #[arg(long, num_args = 1.., value_name = "TOOL [NAME=VALUE]")]
        derive: Vec<String>,
        /// The program to run and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
    },
    /// Write the man pages (agent-shim(1) and one per subcommand) and the
    /// bash, zsh and fish completions under DIR (DIR/man/man1,
    /// DIR/completions/SHELL), and print their paths.
    #[command(hide = true)]
    GenerateDocs {
        /// Where to write them.
        #[arg(value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Show what a token allows and how much of it is left, as the broker
    /// sees it: tools and their constraints, uses left, expiry (as an ISO
    /// time and as "in 4m 12s"), issuer, task, parents, and why it cannot
    /// be used now if so. Inside `agent-shim run` without a token: the
    /// bound token. The broker answers to the token's audience, its
    /// issuer and admins.
    Inspect {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        token: TokenArg,
        /// The token (default: --token or $KEYWARD_TOKEN). Visible to
        /// other processes until the shim overwrites it: prefer the
        /// variable.
        #[arg(value_name = "TOKEN", conflicts_with = "token")]
        positional: Option<String>,
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
            // `--json` asked for machine-readable output: a usage error is
            // a failure like any other.
            if e.use_stderr() && wants_json(std::env::args_os()) {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid arguments");
                print_error_json("usage", first.trim_start_matches("error: "));
            }
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
            Err(e) => fail_as(json, "usage", &e),
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
            Err(e) => fail_as(json || json_schema, "usage", &e),
        },
        Command::GenerateDocs { out } => match crate::manual::write_docs(Cli::command(), &out) {
            Ok(written) => {
                for path in written {
                    println!("{}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&format!("writing the documentation: {e}")),
        },
        Command::TaskHash { task } => {
            println!(
                "{}",
                keyward_proto::token::hex(&keyward_proto::token::task_hash(&task))
            );
            ExitCode::SUCCESS
        }
        Command::Token(TokenCommand::Inspect {
            json,
            token,
            positional,
        }) => {
            let token = match positional {
                Some(text) => TokenArg { token: Some(text) },
                None => token,
            };
            match token.get() {
                Ok(token) => inspect(token.as_ref(), json),
                Err(e) => fail(&e),
            }
        }
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
            allow_connect,
            memory,
            pids,
            cpu_time,
            max_file_size,
            verbose,
            derive,
            command,
        } => {
            let derive = match parse_derive(derive) {
                Ok(derive) => derive,
                Err(e) => return fail(&format!("run: --derive: {e}")),
            };
            run(&crate::sandbox::RunOptions {
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
                allow_connect,
                limits: crate::sandbox::Limits {
                    memory,
                    pids,
                    cpu_time,
                    max_file_size,
                },
                verbose,
                command,
                derive,
            })
        }
    }
}

/// `--derive TOOL NAME=VALUE...`.
fn parse_derive(args: Vec<String>) -> Result<Option<crate::sandbox::Derive>, String> {
    let mut args = args.into_iter();
    let Some(tool) = args.next() else {
        return Ok(None);
    };
    let params = args
        .map(|a| parse_param(&a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(crate::sandbox::Derive { tool, params }))
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
    fail_as(false, "usage", message)
}

/// Whether a command line that did not parse asked for `--json` output:
/// `call` or `tools` with `--json` before any `--`.
fn wants_json(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    let args: Vec<_> = args.skip(1).take_while(|a| a != "--").collect();
    let command = args.iter().find(|a| !a.to_string_lossy().starts_with('-'));
    command.is_some_and(|c| c == "call" || c == "tools") && args.iter().any(|a| a == "--json")
}

/// An error that is not the broker's answer; with `json`, also as
/// `{"error": {"kind", "message"}}` on stdout.
fn fail_as(json: bool, kind: &str, message: &str) -> ExitCode {
    if json {
        print_error_json(kind, message);
    }
    eprintln!("agent-shim: {message}");
    ExitCode::from(EXIT_ERROR)
}

/// `{"error": {"kind": KIND, "message": MESSAGE}}` and a newline, on
/// stdout: what `--json` prints for every failure.
fn print_error_json(kind: &str, message: &str) {
    print_json(&error_json(kind, message));
}

fn error_json(kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "error": { "kind": kind, "message": message } })
}

/// `Upstream` → `upstream`, `VersionMismatch` → `version_mismatch`.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.char_indices() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
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
        Ok(Response::ToolList(list)) if list.tools.is_empty() => {
            let bound = std::env::var_os(KEYWARD_FD_ENV).is_some();
            let why = if token.is_some() || bound {
                "the token grants no tool that its issuer may still delegate under the \
                 broker's policy"
                    .to_owned()
            } else {
                format!(
                    "uid {} may call no tool directly: no principal of the broker's policy \
                     that matches it has may_call tools; act with a token (--token or \
                     $KEYWARD_TOKEN) or ask the broker's admin",
                    nix::unistd::getuid()
                )
            };
            if json || json_schema {
                print_json(&serde_json::json!({ "denied": format!("no tools: {why}") }));
            }
            eprintln!("agent-shim: no tools: {why}");
            ExitCode::from(EXIT_DENIED)
        }
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
        other => report_failure(other, json || json_schema),
    }
}

fn tool_json(tool: &ToolInfo) -> serde_json::Value {
    serde_json::json!({
        "name": tool.name,
        "kind": kind_name(tool.kind),
        "description": tool.description,
        "params": tool.params.iter().map(|p| serde_json::json!({
            "name": p.name,
            "type": p.ty,
            "required": p.required,
            "default": p.default.as_ref().map(value_json),
            "rules": p.rules,
        })).collect::<Vec<_>>(),
    })
}

/// `tool` or `gateway`, as `tools --json` says it.
fn kind_name(kind: ToolKind) -> &'static str {
    match kind {
        ToolKind::Tool => "tool",
        ToolKind::Gateway => "gateway",
    }
}

/// Each tool with its description, then one line per parameter: name,
/// type, `required` or its default, and every rule; then each gateway
/// (`gateway NAME: ...`, with how to reach it), its `method` and `path`
/// the same way.
fn print_tool_table(tools: &[ToolInfo]) {
    print!("{}", tool_table(tools));
}

fn tool_table(tools: &[ToolInfo]) -> String {
    let shown_default = |p: &keyward_proto::ParamInfo| match (&p.default, p.required) {
        (_, true) => "required".to_owned(),
        (Some(v), false) => format!("default {}", value_json(v)),
        (None, false) => "optional".to_owned(),
    };
    let width = |f: &dyn Fn(&keyward_proto::ParamInfo) -> usize, min: usize| {
        tools
            .iter()
            .flat_map(|t| t.params.iter())
            .map(f)
            .max()
            .unwrap_or(0)
            .max(min)
    };
    let name_w = width(&|p| p.name.len(), 9);
    let ty_w = width(&|p| p.ty.len(), 4);
    let default_w = width(&|p| shown_default(p).len(), 8);
    let mut out = String::new();
    let (callable, gateways): (Vec<&ToolInfo>, Vec<&ToolInfo>) =
        tools.iter().partition(|t| t.kind == ToolKind::Tool);
    for tool in callable.into_iter().chain(gateways) {
        let description = if tool.description.is_empty() {
            "(no description)"
        } else {
            tool.description.as_str()
        };
        match tool.kind {
            ToolKind::Tool => out.push_str(&format!("{}: {description}\n", tool.name)),
            ToolKind::Gateway => out.push_str(&format!(
                "gateway {}: {description}\n    (not a tool: a program reaches it over HTTP \
                 with agent-shim run --gateway {})\n",
                tool.name, tool.name
            )),
        }
        if tool.params.is_empty() {
            out.push_str("    (no parameters)\n");
        }
        for p in &tool.params {
            let rules = if p.rules.is_empty() {
                "-".to_owned()
            } else {
                p.rules.join("; ")
            };
            out.push_str(&format!(
                "    {:<name_w$}  {:<ty_w$}  {:<default_w$}  {rules}\n",
                p.name,
                p.ty,
                shown_default(p),
            ));
        }
    }
    out
}

/// `token inspect`: inside `agent-shim run` the bound token (over a
/// channel of the session); elsewhere the given one, on a new connection.
fn inspect(token: Option<&Token>, json: bool) -> ExitCode {
    let bound = std::env::var_os(KEYWARD_FD_ENV).is_some();
    // A token given inside `run` is sent too: the bound session may not
    // ask about another token, and the broker says so.
    let request = match (token, bound) {
        (None, true) => Request::Inspect(keyward_proto::Inspect { token: None }),
        (Some(token), _) => Request::Inspect(keyward_proto::Inspect {
            token: Some(token.expose().to_owned()),
        }),
        (None, false) => {
            return fail(
                "no token to inspect: give TOKEN, --token or $KEYWARD_TOKEN \
                 (inside agent-shim run, the bound token is inspected)",
            )
        }
    };
    let reply = crate::client::from_env_or_socket().and_then(|mut c| c.request(&request));
    match reply {
        Ok(Response::TokenInfo(info)) => {
            if json {
                print_json(&token_info_json(&info));
            } else {
                print!("{}", token_info_text(&info));
            }
            ExitCode::SUCCESS
        }
        other => report_failure(other, json),
    }
}

/// Unix seconds as an ISO 8601 UTC time.
fn iso_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

/// `in 4m 12s`, or `4m 12s ago`.
fn relative(at: u64, now: u64) -> String {
    let span = |secs: u64| humantime::format_duration(std::time::Duration::from_secs(secs));
    if at >= now {
        format!("in {}", span(at - now))
    } else {
        format!("{} ago", span(now - at))
    }
}

fn uses_text(info: &keyward_proto::TokenInfo) -> String {
    match info.max_uses {
        Some(max) => format!(
            "{} left ({} of {max} used)",
            max.saturating_sub(info.uses),
            info.uses
        ),
        None => format!("no limit ({} used)", info.uses),
    }
}

fn token_info_text(info: &keyward_proto::TokenInfo) -> String {
    use keyward_proto::token::hex;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<10} {v}\n"));
    line("token", info.id.to_string());
    line("issuer", info.issuer.clone());
    line("task", hex(&info.task));
    line(
        "audience",
        match info.audience.gid {
            Some(gid) => format!("uid {} gid {gid}", info.audience.uid),
            None => format!("uid {}", info.audience.uid),
        },
    );
    line(
        "expires",
        format!(
            "{} ({})",
            iso_time(info.expires),
            relative(info.expires, info.now)
        ),
    );
    line("uses", uses_text(info));
    if !info.lineage.is_empty() {
        let parents: Vec<String> = info.lineage.iter().rev().map(|id| id.to_string()).collect();
        line("parents", parents.join(" <- "));
    }
    if info.exact_call {
        line("exact", "good for exactly one call".to_owned());
    }
    line(
        "state",
        match &info.unusable {
            Some(why) => format!("unusable: {why}"),
            None => "usable".to_owned(),
        },
    );
    out.push('\n');
    if info.tools.is_empty() {
        out.push_str("(no tool its issuer may still delegate)\n");
    }
    out.push_str(&tool_table(&info.tools));
    out
}

fn token_info_json(info: &keyward_proto::TokenInfo) -> serde_json::Value {
    use keyward_proto::token::hex;
    serde_json::json!({
        "id": info.id.to_string(),
        "issuer": info.issuer,
        "task": hex(&info.task),
        "audience": { "uid": info.audience.uid, "gid": info.audience.gid },
        "not_before": iso_time(info.not_before),
        "expires": iso_time(info.expires),
        "expires_in": relative(info.expires, info.now),
        "expires_in_secs": info.expires.saturating_sub(info.now),
        "uses": info.uses,
        "max_uses": info.max_uses,
        "uses_left": info.max_uses.map(|m| m.saturating_sub(info.uses)),
        "parents": info.lineage.iter().rev().map(|id| id.to_string()).collect::<Vec<_>>(),
        "exact_call": info.exact_call,
        "unusable": info.unusable,
        "tools": info.tools.iter().map(tool_json).collect::<Vec<_>>(),
    })
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
/// With `json`, also `{"error": {"kind", "message"}}` on stdout.
fn report_failure(response: Result<Response, ClientError>, json: bool) -> ExitCode {
    let (kind, message, code) = match response {
        Ok(Response::Denied(denial)) => ("denied".to_owned(), denial.reason, EXIT_DENIED),
        Ok(Response::Error(e)) => (
            snake_case(&format!("{:?}", e.code)),
            format!("broker error ({:?}): {}", e.code, e.message),
            EXIT_ERROR,
        ),
        Ok(other) => (
            "protocol".to_owned(),
            format!("unexpected reply from the broker: {other:?}"),
            EXIT_ERROR,
        ),
        Err(e) => (e.kind().to_owned(), e.to_string(), EXIT_ERROR),
    };
    if json {
        print_error_json(&kind, &message);
    }
    eprintln!("agent-shim: {message}");
    ExitCode::from(code)
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
        let failed = (result.status >= 400).then(|| upstream_failure(result.status));
        if let Some(message) = &failed {
            envelope["error"] = error_json("upstream_status", message)["error"].take();
        }
        print_json(&envelope);
    } else if write_body(&result.body).is_err() {
        return ExitCode::from(EXIT_ERROR);
    }
    if result.status >= 400 {
        eprintln!("agent-shim: {}", upstream_failure(result.status));
        return ExitCode::from(EXIT_ERROR);
    }
    ExitCode::SUCCESS
}

fn upstream_failure(status: u16) -> String {
    format!("upstream answered with status {status}")
}

/// The body, byte for byte; on a terminal, with a newline after it if it
/// has none, so the prompt starts on a line of its own. (A pipe or file
/// gets the exact bytes.)
fn write_body(body: &[u8]) -> std::io::Result<()> {
    use std::io::IsTerminal as _;
    let mut out = std::io::stdout().lock();
    out.write_all(body)?;
    if out.is_terminal() && !body.is_empty() && !body.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.flush()
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> impl Iterator<Item = std::ffi::OsString> {
        std::iter::once("agent-shim")
            .chain(line.split_whitespace())
            .map(std::ffi::OsString::from)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn only_call_and_tools_with_json_want_a_json_error() {
        assert!(wants_json(args("call --json echo bad")));
        assert!(wants_json(args("tools --json --bogus")));
        assert!(!wants_json(args("call echo bad")));
        assert!(!wants_json(args("run --bogus -- prog --json")));
        assert!(!wants_json(args("mint --json")));
    }

    #[test]
    fn error_codes_read_as_snake_case() {
        assert_eq!(snake_case("VersionMismatch"), "version_mismatch");
        assert_eq!(snake_case("Upstream"), "upstream");
    }
}
