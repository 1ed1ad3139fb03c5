// SPDX-License-Identifier: Apache-2.0
//! `agent-shim`: parses arguments, calls the library, prints the result.
//!
//! Exit status: 0 on success, 3 when the broker denied the call (the reason
//! on stderr in one sentence), 1 on any other error.

use std::io::Write;
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Parser, Subcommand};

use agent_shim::client::{socket_path, Client};
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
    }
}

fn call(tool: &str, params: &[(String, String)], json: bool) -> ExitCode {
    let response = Client::connect(&socket_path()).and_then(|mut c| c.call(tool, params));
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
