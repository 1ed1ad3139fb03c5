// SPDX-License-Identifier: Apache-2.0
//! The daemon assembled: each `keyward-broker` command as a library
//! function (`main.rs` only parses arguments and turns the result into an
//! exit code). `run_serve` loads the configuration, compiles the policy,
//! loads the credentials, opens the token state, binds or inherits the
//! socket and serves until SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::audit::{Audit, AuditTarget};
use crate::config::{Source, EXAMPLE};
use crate::credential;
use crate::executor::Executor;
use crate::keys::Keys;
use crate::limits::{self, Limits};
use crate::listener::{self, Listener};
use crate::notify::Notifier;
use crate::policy::Policy;
use crate::reload::reload_on_hangup;
use crate::token::{self, Tokens};
use crate::{serve, sys, Broker, Error};

/// The token authority, when there is a state directory (created 0700 if
/// missing); without one the broker serves direct calls only.
fn open_tokens(
    policy: &Policy,
    credentials: &credential::Credentials,
) -> Result<Option<Tokens>, Error> {
    let Some(dir) = token::state_directory(policy.broker.state_dir.as_deref()) else {
        eprintln!("keyward-broker: no state_dir configured: tokens are disabled");
        return Ok(None);
    };
    create_private_dir(&dir).map_err(|source| sys::SysError::Call {
        what: "creating the state directory",
        source,
    })?;
    Ok(Some(Tokens::open(policy, &dir, credentials)?))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

pub fn run_pubkey(path: &Path) -> Result<(), Error> {
    let source = Source::load(path)?;
    let policy = Policy::compile(&source).map_err(Error::Policy)?;
    let keys = match &policy.broker.signing_key {
        Some(name) => {
            let credentials = credential::load_for(&source, policy.basic_users())?;
            let secret = credentials
                .get(name)
                .ok_or_else(|| token::TokenSetupError::MissingCredential(name.clone()))?;
            Keys::from_credential(name, secret).map_err(token::TokenSetupError::from)?
        }
        None => {
            let dir = token::state_directory(policy.broker.state_dir.as_deref())
                .ok_or(token::TokenSetupError::NoStateDirectory)?;
            Keys::load_existing(&dir).map_err(token::TokenSetupError::from)?
        }
    };
    println!("{}", keys.public_text());
    Ok(())
}

/// How long `revoke` waits for the broker's answer: it writes one record
/// to the state and one to the audit trail.
const REVOKE_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn run_revoke(path: &Path, id: &str) -> ExitCode {
    use keyward_proto::{Request, Response, Revoke};
    let fail = |message: String| {
        eprintln!("keyward-broker: {message}");
        ExitCode::FAILURE
    };
    let id: keyward_proto::token::TokenId = match id.parse() {
        Ok(id) => id,
        Err(e) => return fail(format!("{id:?}: {e}")),
    };
    let socket = match Source::load(path) {
        // `$KEYWARD_SOCKET` by the client's rule (an empty value is unset).
        Ok(source) => keyward_client::socket_path_or(source.config.broker.socket),
        Err(e) => return fail(e.to_string()),
    };
    // Bounded waits: a broker that is stopped or swamped gets a clear
    // error, not a hang.
    let reply = keyward_client::Client::connect_within(&socket, keyward_client::CONNECT_TIMEOUT)
        .and_then(|mut client| {
            client.set_reply_timeout(REVOKE_REPLY_TIMEOUT)?;
            client.request(&Request::Revoke(Revoke { id }))
        });
    match reply {
        Ok(Response::Revoked(r)) => {
            println!("revoked {}", r.id);
            ExitCode::SUCCESS
        }
        Ok(Response::Denied(d)) => {
            eprintln!("keyward-broker: {}", d.reason);
            ExitCode::from(3)
        }
        Ok(other) => fail(format!("unexpected reply from the broker: {other:?}")),
        Err(e) => fail(e.to_string()),
    }
}

pub fn run_check(path: &Path, with_credentials: bool) -> Result<(), Error> {
    let source = Source::load(path)?;
    let policy = Policy::compile(&source).map_err(Error::Policy)?;
    if with_credentials {
        credential::load_for(&source, policy.basic_users())?;
    }
    println!(
        "{}: ok ({} principals, {} tools, {} credentials{})",
        path.display(),
        source.config.principals.len(),
        source.config.tools.len(),
        source.config.credentials.len(),
        if with_credentials { ", all loaded" } else { "" }
    );
    Ok(())
}

pub fn run_serve(config: Option<&Path>, example: bool, audit: AuditTarget) -> Result<(), Error> {
    // Before any secret exists in this process.
    sys::harden_process()?;
    let source = match config {
        Some(path) => Source::load(path)?,
        None => example_source()?,
    };
    let policy = Policy::compile(&source).map_err(Error::Policy)?;
    // Every session holds descriptors: take all the kernel allows, and
    // keep the session cap below it.
    let fd_limit = limits::raise_fd_limit()?;
    let limits = Limits::from_config(&source.config.broker, fd_limit)?;
    // Socket activation edits the environment: before any thread starts.
    let inherited = listener::activation_fd()?;
    let notifier = Notifier::from_env();
    let audit = Audit::open(audit)?;
    let credentials = credential::load_for(&source, policy.basic_users())?;
    let tokens = open_tokens(&policy, &credentials)?;
    let executor = Executor::new(credentials)?;
    let settings = policy.broker.clone();
    let mut broker = Broker::new(policy, executor, audit)
        .with_config_path(config)
        .with_notifier(notifier)
        .with_limits(limits, fd_limit);
    if let Some(tokens) = tokens {
        broker = broker.with_tokens(tokens);
    }
    let broker = Arc::new(broker);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| sys::SysError::Call {
            what: "starting the runtime",
            source: e,
        })?;
    runtime.block_on(async move {
        let listener = match inherited {
            Some(fd) => Listener::from_fd(fd)?,
            None => Listener::bind(
                &settings.socket,
                settings.socket_mode,
                settings.socket_group.as_deref(),
            )?,
        };
        if example {
            print_example_usage(&settings.socket, broker.audit.is_journal());
        }
        let reloads = reload_on_hangup(Arc::clone(&broker), config.map(Path::to_path_buf))
            .map_err(|source| sys::SysError::Call {
                what: "installing the SIGHUP handler",
                source,
            })?;
        tokio::spawn(reloads);
        serve(listener, broker, shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default action (exit) still applies.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The embedded example, placed in a private runtime directory: the socket
/// and an example credential there, the current user as principal.
fn example_source() -> Result<Source, Error> {
    let uid = nix::unistd::getuid().as_raw();
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("keyward-example-{uid}"));
    let creds = dir.join("credentials");
    let io = |what: &'static str| {
        move |source: std::io::Error| Error::Sys(sys::SysError::Call { what, source })
    };
    write_example_files(&dir, &creds).map_err(io("creating the example directory"))?;
    let mut source = Source::parse("(built-in example)", EXAMPLE.to_owned())?;
    source.config.broker.socket = dir.join("broker.sock");
    source.config.broker.credentials_dir = Some(creds);
    source.config.broker.state_dir = Some(dir.join("state"));
    for principal in &mut source.config.principals {
        principal.get_mut().uids = vec![uid];
    }
    // The example must not pick up a systemd credentials directory.
    std::env::remove_var("CREDENTIALS_DIRECTORY");
    std::env::remove_var("STATE_DIRECTORY");
    Ok(source)
}

fn write_example_files(dir: &Path, creds: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(creds)?;
    for d in [dir, creds] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    let token = creds.join("example_api.token");
    let _ = std::fs::remove_file(&token);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(token)?;
    std::io::Write::write_all(&mut file, EXAMPLE_CREDENTIAL.as_bytes())
}

/// The example credential: not a secret, it only exists so the example's
/// http tools have something to inject (and redact).
const EXAMPLE_CREDENTIAL: &str = include_str!("../../examples/credentials/example_api.token");

fn print_example_usage(socket: &Path, to_journal: bool) {
    println!(
        "keyward-broker: example broker listening on {}",
        socket.display()
    );
    println!("  try, in another terminal:");
    println!(
        "    KEYWARD_SOCKET={} cargo run -q -p agent-shim -- call echo message=hello",
        socket.display()
    );
    if to_journal {
        println!("  stop with Ctrl-C; audit records go to the journal:");
        println!(
            "    journalctl -f SYSLOG_IDENTIFIER=keyward-broker _UID={}",
            nix::unistd::getuid()
        );
    } else {
        println!("  stop with Ctrl-C; audit records follow on stderr.");
    }
}
