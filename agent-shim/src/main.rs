// SPDX-License-Identifier: Apache-2.0
//! `agent-shim`: parses arguments, calls the library, prints the result.
//!
//! Exit status: 0 on success, 3 when the broker denied the call (the reason
//! on stderr in one sentence), 1 on any other error.

use std::io::Write;
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Parser, Subcommand};

use agent_shim::client::Client;
use keyward_proto::{CallResult, Response};

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
        /// The tool to call, as named in the broker's policy.
        tool: String,
        /// Parameters as NAME=VALUE; the broker checks each against the
        /// tool's policy.
        #[arg(value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// Run CMD in a sandbox whose only way to the broker is a connection
    /// bound to a token.
    ///
    /// The shim connects to the broker and binds the token (from --token,
    /// --token-file or $KEYWARD_TOKEN); then, in a child process: a new
    /// session, death with the shim, every descriptor closed but 0-2 and the
    /// bound broker channel as fd 3 ($KEYWARD_FD=3; without a token there
    /// is no channel), an environment cleared to a short allowlist plus
    /// --keep-env names (never $KEYWARD_TOKEN), no core dumps,
    /// no_new_privs, Landlock (read+exec on system directories, read on
    /// --allow-read, read+write on --allow-write, read+exec on --allow-exec
    /// and on CMD itself, nothing else; no TCP; no signals or abstract
    /// sockets outside the sandbox), and a seccomp filter that forbids new
    /// sockets, io_uring, ptrace, namespaces, mounts, and foreign
    /// architectures. Inside, `agent-shim call` reaches the broker through
    /// fd 3.
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
        /// Print what the sandbox enforces on stderr before running CMD.
        #[arg(long, short)]
        verbose: bool,
        /// The program to run and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
    },
}

fn parse_param(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("parameter {arg:?} is not of the form NAME=VALUE")),
    }
}

fn main() -> ExitCode {
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
        Command::Call { json, tool, params } => call(&tool, &params, json),
        Command::Run {
            token,
            token_file,
            allow_read,
            allow_write,
            allow_exec,
            keep_env,
            allow_unsandboxed,
            verbose,
            command,
        } => run(&agent_shim::sandbox::RunOptions {
            token: match (token, token_file) {
                (Some(token), _) => agent_shim::sandbox::TokenSource::Arg(token),
                (None, Some(file)) => agent_shim::sandbox::TokenSource::File(file),
                (None, None) => agent_shim::sandbox::TokenSource::Env,
            },
            allow_read,
            allow_write,
            allow_exec,
            keep_env,
            allow_unsandboxed,
            verbose,
            command,
        }),
    }
}

fn run(options: &agent_shim::sandbox::RunOptions) -> ExitCode {
    match agent_shim::sandbox::run(options) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("agent-shim: run: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn call(tool: &str, params: &[(String, String)], json: bool) -> ExitCode {
    // Inside `agent-shim run` this is a channel over the bound fd 3.
    let response = Client::from_env_or_socket().and_then(|mut c| c.call(tool, params));
    match response {
        Ok(Response::Done(result)) => print_result(&result, json),
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
