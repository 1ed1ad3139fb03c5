// SPDX-License-Identifier: Apache-2.0
//! `keyward-broker`: parses arguments, calls the library, prints the error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use keyward_broker::audit::AuditTarget;
use keyward_broker::daemon::{run_check, run_pubkey, run_revoke, run_serve};

/// keyward-broker holds credentials and performs credentialed calls on
/// behalf of local callers, after its policy has validated every parameter.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the socket named in the configuration, or the one systemd
    /// passed (LISTEN_FDS), until SIGTERM or SIGINT. SIGHUP reloads the
    /// policy (an invalid one is reported and the old one kept). Under
    /// systemd it reports READY=1, STATUS=, WATCHDOG=1 and STOPPING=1.
    Serve {
        /// Configuration file (e.g. /etc/keyward/broker.toml).
        #[arg(long, required_unless_present = "example", conflicts_with = "example")]
        config: Option<PathBuf>,
        /// Run the built-in example configuration with its socket and an
        /// example credential in a private runtime directory, with the
        /// current user as the only principal. For trying keyward out.
        #[arg(long)]
        example: bool,
        /// Where audit records go: journald (native entries with KEYWARD_*
        /// fields), stderr (JSON lines), or auto (journald if its socket
        /// exists, else stderr).
        #[arg(long, value_enum, default_value_t = AuditTarget::Auto)]
        audit: AuditTarget,
    },
    /// Print the public key that verifies this broker's tokens.
    Pubkey {
        /// Configuration file (names the state directory or signing key).
        #[arg(long)]
        config: PathBuf,
    },
    /// Revoke a token, and with it every token attenuated from it, through
    /// the running broker. Allowed to root, to admin_uids and to the
    /// token's issuer. Exits 3 if the broker refuses, which includes an id
    /// this broker never issued (unless it shares a signing_key).
    Revoke {
        /// Configuration file (names the socket).
        #[arg(long)]
        config: PathBuf,
        /// The token id (32 hex digits), as printed by `agent-shim mint`.
        id: String,
    },
    /// Show the running broker's state: version, uptime, the policy in
    /// force (loaded at, blake3 of its file), open sessions per uid, live
    /// tokens, call counts, and each credential's name and state (never a
    /// value). Root or admin_uids only; exits 3 if the broker refuses.
    Status {
        /// Configuration file (names the socket; default: $KEYWARD_SOCKET
        /// or /run/keyward/broker.sock).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the live tokens the running broker issued: id, issuer,
    /// audience, task hash, uses, expiry. Root or admin_uids only; exits 3
    /// if the broker refuses.
    Tokens {
        /// Configuration file (names the socket; default: $KEYWARD_SOCKET
        /// or /run/keyward/broker.sock).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file and its policy; print every error with
    /// its location.
    Check {
        /// Configuration file to check.
        #[arg(long)]
        config: PathBuf,
        /// Also load the credentials (needs read access to them).
        #[arg(long)]
        credentials: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config,
            example,
            audit,
        } => run_serve(config.as_deref(), example, audit),
        Command::Check {
            config,
            credentials,
        } => run_check(&config, credentials),
        Command::Pubkey { config } => run_pubkey(&config),
        Command::Revoke { config, id } => return run_revoke(&config, &id),
        Command::Status { config, json } => {
            return keyward_broker::admin::run_status(config.as_deref(), json)
        }
        Command::Tokens { config, json } => {
            return keyward_broker::admin::run_tokens(config.as_deref(), json)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyward-broker: {e}");
            ExitCode::FAILURE
        }
    }
}
