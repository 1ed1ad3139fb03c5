// SPDX-License-Identifier: Apache-2.0
//! `keyward-broker`: parses arguments, calls the library, prints the error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use keyward_broker::audit::AuditTarget;
use keyward_broker::daemon::{run_check, run_pubkey, run_revoke, run_serve, UnitChoice};

/// keyward-broker holds credentials and performs credentialed calls on
/// behalf of local callers, after its policy has validated every parameter.
#[derive(Parser, Debug)]
#[command(version, long_about = None)]
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
        /// Run the built-in example configuration from a new private
        /// directory (under $XDG_RUNTIME_DIR, else the temp dir) holding its
        /// socket, an example credential, the token state and the effective
        /// configuration (broker.toml, the current user as the only
        /// principal), and print commands to try. The directory is removed
        /// when the broker stops. For trying keyward out.
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
    /// value). Root, admin_uids or the broker's own uid only; exits 3 if
    /// the broker refuses.
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
    /// audience, task hash, uses, expiry. Root, admin_uids or the broker's
    /// own uid only; exits 3 if the broker refuses.
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
    /// its location, and warnings (a credential sent over plain http).
    ///
    /// Where the service unit can be read (--unit, default
    /// /etc/systemd/system/keyward-broker.service if it exists), also
    /// check that its LoadCredential= lines (drop-ins included) load every
    /// credential the configuration names, and that the socket unit beside
    /// it listens where the configuration says, with SOCK_SEQPACKET. And
    /// that peers can be authenticated where it runs (on kernels before
    /// 6.5, /proc must show other users' processes). Exit status 1 on any
    /// error; the unit runs it as ExecStartPre= and before every reload.
    Check {
        /// Configuration file to check.
        #[arg(long)]
        config: PathBuf,
        /// Also load the credentials (needs read access to them).
        #[arg(long)]
        credentials: bool,
        /// The service unit to compare with (its drop-ins and the socket
        /// unit beside it are read too).
        #[arg(long, value_name = "PATH", conflicts_with = "no_unit")]
        unit: Option<PathBuf>,
        /// Do not compare with any unit.
        #[arg(long)]
        no_unit: bool,
        /// Check as before a reload (the unit's ExecReload= runs this):
        /// also ask the running broker (at the configuration's socket, or
        /// $KEYWARD_SOCKET; as root, an admin_uids uid or the broker's own)
        /// which credentials it loaded at start, and fail on each
        /// credential a tool uses that it did not load (a reload never
        /// loads one: restart instead), or whose file is no longer in the
        /// credentials directory. Also fails if the broker cannot be asked.
        #[arg(long)]
        reload: bool,
    },
    /// Write the man pages (keyward-broker(8), one per subcommand,
    /// broker.toml(5)) and the bash, zsh and fish completions under DIR
    /// (DIR/man/man8, DIR/man/man5, DIR/completions/SHELL), and print
    /// their paths.
    #[command(hide = true)]
    GenerateDocs {
        /// Where to write them.
        #[arg(value_name = "DIR")]
        out: PathBuf,
    },
}

/// `generate-docs`: the pages and completions, from these definitions.
fn generate_docs(out: &std::path::Path) -> Result<(), keyward_broker::Error> {
    use keyward_broker::manual;
    let io = |source| {
        keyward_broker::Error::Sys(keyward_broker::sys::SysError::Call {
            what: "writing the documentation",
            source,
        })
    };
    let mut written = manual::write_command_docs(Cli::command(), "8", out).map_err(io)?;
    written.push(manual::write_config_page(out).map_err(io)?);
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
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
            unit,
            no_unit,
            reload,
        } => {
            let unit = match (unit, no_unit) {
                (Some(path), _) => UnitChoice::Path(path),
                (None, true) => UnitChoice::Skip,
                (None, false) => UnitChoice::Default,
            };
            run_check(&config, credentials, &unit, reload)
        }
        Command::Pubkey { config } => run_pubkey(&config),
        Command::GenerateDocs { out } => generate_docs(&out),
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
