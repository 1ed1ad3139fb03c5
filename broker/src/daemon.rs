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
use crate::peer;
use crate::policy::Policy;
use crate::reload::reload_on_hangup;
use crate::token::{self, Tokens};
use crate::{serve, sys, unit, warnings, Broker, Error};

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

/// Which systemd unit `check` compares the configuration with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitChoice {
    /// [`unit::DEFAULT_SERVICE_UNIT`], if it exists.
    Default,
    /// This service unit (it must exist).
    Path(PathBuf),
    /// None.
    Skip,
}

/// How long `check --reload` waits for the running broker's status.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The credentials the running broker at the configuration's socket (or
/// `$KEYWARD_SOCKET`) holds, by its `Status`; or why it could not say.
fn running_credentials(source: &Source) -> Result<Vec<unit::Running>, String> {
    use keyward_proto::{Request, Response};
    let socket = keyward_client::socket_path_or(source.config.broker.socket.clone());
    let why = |reason: String| {
        format!(
            "cannot ask the running broker at {} which credentials it loaded (a reload \
             cannot add one): {reason}",
            socket.display()
        )
    };
    let reply =
        keyward_client::Client::connect_within(&socket, STATUS_TIMEOUT).and_then(|mut client| {
            client.set_reply_timeout(STATUS_TIMEOUT)?;
            client.request(&Request::Status)
        });
    match reply {
        Ok(Response::Status(report)) => Ok(report
            .credentials
            .into_iter()
            .map(|c| unit::Running {
                loaded: !crate::status::is_not_loaded(&c.state),
                name: c.name,
            })
            .collect()),
        Ok(Response::Denied(d)) => Err(why(d.reason)),
        Ok(Response::Error(e)) => Err(why(e.message)),
        Ok(other) => Err(why(format!("unexpected reply {other:?}"))),
        Err(e) => Err(why(e.to_string())),
    }
}

/// `check`: the configuration and policy; the service unit per `unit`;
/// with `with_credentials`, the credentials loaded; with `reload` (the
/// unit's `ExecReload=`), what the running broker would refuse to reload.
pub fn run_check(
    path: &Path,
    with_credentials: bool,
    unit: &UnitChoice,
    reload: bool,
) -> Result<(), Error> {
    let source = Source::load(path)?;
    let policy = Policy::compile(&source).map_err(Error::Policy)?;
    for warning in warnings::config_warnings(&source) {
        eprintln!("keyward-broker: warning: {warning}");
    }
    let unit_path = match unit {
        UnitChoice::Default => {
            Some(PathBuf::from(unit::DEFAULT_SERVICE_UNIT)).filter(|p| p.exists())
        }
        UnitChoice::Path(p) => Some(p.clone()),
        UnitChoice::Skip => None,
    };
    let mut unit_errors = Vec::new();
    if let Some(unit_path) = &unit_path {
        let findings = unit::compare(&source, unit_path)?;
        for warning in &findings.warnings {
            eprintln!("keyward-broker: warning: {warning}");
        }
        unit_errors = findings.errors;
    }
    // Where this runs as the service does (ExecStartPre=), the same check
    // of /proc the broker makes at start.
    if let Err(e) = peer::check_pinning() {
        unit_errors.push(e.to_string());
    }
    if reload {
        match running_credentials(&source) {
            Ok(running) => {
                // Where the next start reads the files, if this process
                // is told (systemd 254 and later hand ExecReload= the
                // service's $CREDENTIALS_DIRECTORY).
                let dir = credential::Credentials::directory(
                    source.config.broker.credentials_dir.as_deref(),
                )
                .ok();
                unit_errors.extend(unit::compare_running(
                    &source,
                    &policy,
                    &running,
                    dir.as_deref(),
                ));
            }
            Err(reason) => unit_errors.push(reason),
        }
    }
    if !unit_errors.is_empty() {
        return Err(Error::Unit(unit_errors));
    }
    if with_credentials {
        credential::load_for(&source, policy.basic_users())?;
    }
    println!(
        "{}: ok ({} principals, {} tools, {} credentials{}{})",
        path.display(),
        source.config.principals.len(),
        source.config.tools.len(),
        source.config.credentials.len(),
        if with_credentials { ", all loaded" } else { "" },
        match &unit_path {
            Some(p) => format!("; agrees with {}", p.display()),
            None => String::new(),
        }
    );
    Ok(())
}

pub fn run_serve(config: Option<&Path>, example: bool, audit: AuditTarget) -> Result<(), Error> {
    // Before any secret exists in this process.
    sys::harden_process()?;
    // The built-in example lives in a private directory, removed (with
    // its socket, credential, state and configuration) when this returns.
    let example_dir = if example {
        Some(create_example_dir()?)
    } else {
        None
    };
    let config_path = match (&example_dir, config) {
        (Some(dir), _) => Some(write_example_config(dir.path())?),
        (None, path) => path.map(Path::to_path_buf),
    };
    let Some(config_path) = config_path else {
        return Err(Error::Config(crate::config::ConfigError::Read {
            path: PathBuf::new(),
            source: std::io::Error::other("no --config given"),
        }));
    };
    if example_dir.is_some() {
        // The example must not pick up a systemd credentials directory.
        std::env::remove_var("CREDENTIALS_DIRECTORY");
        std::env::remove_var("STATE_DIRECTORY");
    }
    let source = Source::load(&config_path)?;
    let policy = Policy::compile(&source).map_err(Error::Policy)?;
    for warning in warnings::config_warnings(&source) {
        eprintln!("keyward-broker: warning: {warning}");
    }
    // Refuse to start where no client could be authenticated.
    if peer::check_pinning()? == peer::PinMethod::PidfdOpen {
        eprintln!(
            "keyward-broker: peers are pinned with pidfd_open and /proc/<pid>/status \
             (no SO_PEERPIDFD)"
        );
    }
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
    let served = runtime.block_on(async move {
        let listener = match inherited {
            Some(fd) => Listener::from_fd(fd)?,
            None => Listener::bind(
                &settings.socket,
                settings.socket_mode,
                settings.socket_group.as_deref(),
            )?,
        };
        if example {
            print_example_usage(&settings.socket, &config_path, broker.audit.is_journal());
        }
        let reloads =
            reload_on_hangup(Arc::clone(&broker), Some(config_path)).map_err(|source| {
                sys::SysError::Call {
                    what: "installing the SIGHUP handler",
                    source,
                }
            })?;
        tokio::spawn(reloads);
        serve(listener, broker, shutdown_signal()).await?;
        Ok(())
    });
    // Sessions still finishing in the background hold nothing in the
    // example directory once the runtime is gone.
    drop(runtime);
    if let Some(dir) = example_dir {
        let path = dir.path().to_owned();
        if let Err(e) = dir.close() {
            eprintln!("keyward-broker: removing {}: {e}", path.display());
        } else if example {
            println!("keyward-broker: removed {}", path.display());
        }
    }
    served
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

/// A new private (0700) directory for the example, under
/// `$XDG_RUNTIME_DIR` (or the temp dir), with a random name.
fn create_example_dir() -> Result<tempfile::TempDir, Error> {
    let uid = nix::unistd::getuid().as_raw();
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(&format!("keyward-example-{uid}-"))
        .tempdir_in(base)
        .map_err(|source| {
            Error::Sys(sys::SysError::Call {
                what: "creating the example directory",
                source,
            })
        })
}

/// The embedded example made effective: socket, credential and state in
/// `dir`, the current user as its principals' uid; written as
/// `dir/broker.toml` (so `revoke`, `pubkey` and a SIGHUP reload work on
/// it), with its example credential in `dir/credentials`.
fn write_example_config(dir: &Path) -> Result<PathBuf, Error> {
    let io = |what: &'static str| {
        move |source: std::io::Error| Error::Sys(sys::SysError::Call { what, source })
    };
    let creds = dir.join("credentials");
    write_example_credential(&creds).map_err(io("writing the example credential"))?;
    let uid = nix::unistd::getuid().as_raw();
    let text = effective_example(EXAMPLE, dir, uid).map_err(|message| {
        Error::Config(crate::config::ConfigError::Parse {
            path: PathBuf::from("(built-in example)"),
            message,
        })
    })?;
    let path = dir.join("broker.toml");
    std::fs::write(&path, text).map_err(io("writing the example configuration"))?;
    Ok(path)
}

/// The example's text with its paths moved into `dir` and `uid` as the
/// only uid of every principal.
fn effective_example(example: &str, dir: &Path, uid: u32) -> Result<String, String> {
    let mut table: toml::Table = example
        .parse()
        .map_err(|e: toml::de::Error| e.to_string())?;
    let path = |p: PathBuf| toml::Value::String(p.to_string_lossy().into_owned());
    if let Some(broker) = table.get_mut("broker").and_then(|b| b.as_table_mut()) {
        broker.insert("socket".into(), path(dir.join("broker.sock")));
        broker.insert("credentials_dir".into(), path(dir.join("credentials")));
        broker.insert("state_dir".into(), path(dir.join("state")));
    }
    if let Some(principals) = table.get_mut("principal").and_then(|p| p.as_array_mut()) {
        for principal in principals.iter_mut().filter_map(|p| p.as_table_mut()) {
            principal.insert(
                "uids".into(),
                toml::Value::Array(vec![toml::Value::Integer(i64::from(uid))]),
            );
        }
    }
    let body = toml::to_string(&table).map_err(|e| e.to_string())?;
    Ok(format!(
        "# Written by `keyward-broker serve --example`: the built-in example\n\
         # (examples/broker.toml) with its paths in this directory and uid {uid}\n\
         # as the principal. Removed, with this directory, when the broker stops.\n\n{body}"
    ))
}

fn write_example_credential(creds: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().mode(0o700).create(creds)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(creds.join("example_api.token"))?;
    std::io::Write::write_all(&mut file, EXAMPLE_CREDENTIAL.as_bytes())
}

/// The example credential: not a secret, it only exists so the example's
/// http tools have something to inject (and redact).
const EXAMPLE_CREDENTIAL: &str = include_str!("../../examples/credentials/example_api.token");

/// `agent-shim` beside this binary (both come out of one `cargo build`),
/// as an absolute path; `None` if it was not built.
fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join(name);
    path.is_file().then_some(path)
}

fn print_example_usage(socket: &Path, config: &Path, to_journal: bool) {
    let uid = nix::unistd::getuid();
    let broker = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "keyward-broker".to_owned());
    println!(
        "keyward-broker: example broker listening on {}",
        socket.display()
    );
    println!(
        "  its configuration: {} (removed with its directory on stop)",
        config.display()
    );
    println!("  try, from another terminal, as the same user (uid {uid}):");
    println!("    export KEYWARD_SOCKET={}", socket.display());
    let shim = match sibling_binary("agent-shim") {
        Some(shim) => shim.display().to_string(),
        None => {
            println!("    cargo build --release --locked -p agent-shim   # not built yet");
            "target/release/agent-shim".to_owned()
        }
    };
    println!("    {shim} call echo message=hello");
    println!("    {shim} tools");
    println!("    T=$({shim} mint --tool echo --ttl 5m --task try)");
    println!("    KEYWARD_TOKEN=$T {shim} call echo message=delegated");
    println!("    {broker} pubkey --config {}", config.display());
    println!(
        "    {broker} revoke --config {} ID   # the id mint printed",
        config.display()
    );
    if to_journal {
        println!("  stop with Ctrl-C; audit records go to the journal:");
        println!("    journalctl -f SYSLOG_IDENTIFIER=keyward-broker _UID={uid}");
    } else {
        println!("  stop with Ctrl-C; audit records follow on stderr.");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_example_compiles_with_its_paths_moved() {
        let dir = Path::new("/tmp/keyward-example-0-abc");
        let text = effective_example(EXAMPLE, dir, 4321).unwrap();
        let source = Source::parse("broker.toml", text).unwrap();
        let policy = Policy::compile(&source).unwrap();
        assert_eq!(policy.broker.socket, dir.join("broker.sock"));
        assert_eq!(
            policy.broker.credentials_dir.as_deref(),
            Some(dir.join("credentials").as_path())
        );
        assert_eq!(
            policy.broker.state_dir.as_deref(),
            Some(dir.join("state").as_path())
        );
        let caller = crate::policy::Caller::new(4321, 4321);
        assert!(policy.principals_of(&caller).count() > 0);
        assert_eq!(
            policy
                .principals_of(&crate::policy::Caller::new(1000, 1000))
                .count(),
            0
        );
    }
}
