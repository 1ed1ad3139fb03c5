// SPDX-License-Identifier: Apache-2.0
//! What `keyward-broker check` can tell by reading the installed systemd
//! units: whether every credential the configuration names is loaded by a
//! `LoadCredential=` line (a missing one stops the broker at start; an
//! unused one is worth a look), and whether the socket unit listens where
//! the configuration says (`keyward-broker revoke` connects there) with a
//! `SOCK_SEQPACKET` socket.
//!
//! Only what systemd itself would read: the unit file, then its drop-ins
//! (`UNIT.d/*.conf`, in name order), `[Service]` or `[Socket]` entries,
//! comments and line continuations as systemd treats them, an empty
//! assignment resetting a list.
//!
//! And what `check --reload` (the unit's `ExecReload=`) can tell before the
//! broker is signalled ([`compare_running`]): a reload never loads a
//! credential, so every credential a tool of the new configuration uses
//! must be one the running broker loaded at start, and its file must still
//! be where the next start reads it; otherwise the broker would keep the
//! old policy (or fail at its next start) while `systemctl reload`
//! reported success.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::Source;
use crate::policy::Policy;

/// The service unit `check` compares with when it exists.
pub const DEFAULT_SERVICE_UNIT: &str = "/etc/systemd/system/keyward-broker.service";

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the comparison found: errors (the broker will not work as
/// configured) and warnings (it will, but something is off).
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// One `Key=Value` of a section, in the order systemd applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: String,
    value: String,
}

/// The entries of `section` in `unit` and its drop-ins. A missing drop-in
/// directory is fine; a missing unit is an error.
fn read_section(unit: &Path, section: &str) -> Result<Vec<Entry>, UnitError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| UnitError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let mut entries = parse_section(&read(unit)?, section);
    let mut dropins_dir = unit.as_os_str().to_owned();
    dropins_dir.push(".d");
    if let Ok(dir) = std::fs::read_dir(&dropins_dir) {
        let mut dropins: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        dropins.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        for dropin in dropins {
            entries.extend(parse_section(&read(&dropin)?, section));
        }
    }
    Ok(entries)
}

/// `Key=Value` lines of `[section]` in unit-file text.
fn parse_section(text: &str, section: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut in_section = false;
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        // A backslash at the end continues the line (joined by a space).
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        let full = full.trim();
        if let Some(name) = full.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = name == section;
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((key, value)) = full.split_once('=') {
            entries.push(Entry {
                key: key.trim().to_owned(),
                value: value.trim().to_owned(),
            });
        }
    }
    entries
}

/// The credential ids a `[Service]` section gives the service.
fn credential_ids(entries: &[Entry]) -> (BTreeSet<String>, Vec<String>) {
    let mut ids = BTreeSet::new();
    let mut uncompared = Vec::new();
    for entry in entries {
        match entry.key.as_str() {
            "LoadCredential"
            | "LoadCredentialEncrypted"
            | "SetCredential"
            | "SetCredentialEncrypted" => {
                if entry.value.is_empty() {
                    // An empty assignment resets the list.
                    ids.clear();
                } else {
                    let id = entry.value.split(':').next().unwrap_or_default();
                    ids.insert(id.to_owned());
                }
            }
            "ImportCredential" => uncompared.push(entry.value.clone()),
            _ => {}
        }
    }
    (ids, uncompared)
}

/// The socket unit beside a service unit: `keyward-broker.service` →
/// `keyward-broker.socket`.
fn socket_unit_of(service: &Path) -> PathBuf {
    service.with_extension("socket")
}

/// Compare the configuration with the service unit at `service` (and the
/// socket unit beside it, if there is one).
pub fn compare(source: &Source, service: &Path) -> Result<Findings, UnitError> {
    let mut findings = Findings::default();
    let unit = service.display();
    let entries = read_section(service, "Service")?;
    let (loaded, uncompared) = credential_ids(&entries);
    for glob in uncompared {
        findings.warnings.push(format!(
            "{unit}: ImportCredential={glob} is not compared with the configuration"
        ));
    }
    let mut wanted = BTreeSet::new();
    for (name, entry) in &source.config.credentials {
        for file in entry.get_ref().secret_files() {
            let file = file.to_string_lossy().into_owned();
            if !loaded.contains(&file) {
                findings.errors.push(format!(
                    "credential {name:?} (file {file:?}) has no LoadCredential={file}:... line in \
                 {unit} or its drop-ins: the broker will not start \
                 (systemctl edit keyward-broker.service)"
                ));
            }
            wanted.insert(file);
        }
    }
    for id in loaded.difference(&wanted) {
        findings.warnings.push(format!(
            "{unit} loads credential {id:?}, which no [credential.NAME] of the configuration uses"
        ));
    }

    let socket_unit = socket_unit_of(service);
    if !socket_unit.exists() {
        return Ok(findings);
    }
    compare_socket(source, &socket_unit, &mut findings)?;
    Ok(findings)
}

fn compare_socket(
    source: &Source,
    socket_unit: &Path,
    findings: &mut Findings,
) -> Result<(), UnitError> {
    let unit = socket_unit.display();
    let broker = &source.config.broker;
    let entries = read_section(socket_unit, "Socket")?;
    let last = |key: &str| {
        entries
            .iter()
            .rev()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    let listens: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.key.starts_with("Listen") && !e.value.is_empty())
        .collect();
    match listens.iter().find(|e| e.key == "ListenSequentialPacket") {
        Some(entry) => {
            if Path::new(&entry.value) != broker.socket {
                findings.errors.push(format!(
                    "{unit} listens on {}, but the configuration's socket is {}: \
                     `keyward-broker revoke` and clients using the configuration would \
                     connect to the wrong path",
                    entry.value,
                    broker.socket.display()
                ));
            }
        }
        None => findings.errors.push(format!(
            "{unit} has no ListenSequentialPacket= line{}: the broker serves only a \
             SOCK_SEQPACKET socket",
            match listens.first() {
                Some(e) => format!(" (it has {}={})", e.key, e.value),
                None => String::new(),
            }
        )),
    }
    if let Some(mode) = last("SocketMode") {
        let parsed = u32::from_str_radix(mode, 8).ok();
        let configured = u32::from_str_radix(&broker.socket_mode, 8).ok();
        if parsed != configured {
            findings.warnings.push(format!(
                "{unit} sets SocketMode={mode}, the configuration socket_mode = {:?} \
                 (under socket activation the unit's applies)",
                broker.socket_mode
            ));
        }
    }
    if let (Some(group), Some(configured)) = (last("SocketGroup"), &broker.socket_group) {
        if group != configured {
            findings.warnings.push(format!(
                "{unit} sets SocketGroup={group}, the configuration socket_group = \
                 {configured:?} (under socket activation the unit's applies)"
            ));
        }
    }
    if last("PassCredentials").is_some_and(|v| !matches!(v, "yes" | "true" | "on" | "1")) {
        findings.warnings.push(format!(
            "{unit} sets PassCredentials=no; the broker turns SO_PASSCRED on itself"
        ));
    }
    Ok(())
}

/// A credential as the running broker reports it (`Status`): its name and
/// whether it holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub name: String,
    pub loaded: bool,
}

/// What a reload of `source` (compiled as `policy`) would fail on, in a
/// broker that holds the credentials `running`: each credential a tool
/// uses that the broker did not load at start, and, where the credentials
/// directory `dir` can be read, each file of such a credential that is
/// not in it. One message per finding, naming the credential and the file.
pub fn compare_running(
    source: &Source,
    policy: &Policy,
    running: &[Running],
    dir: Option<&Path>,
) -> Vec<String> {
    // Each credential a tool uses, with the first tool (by name) using it.
    let mut used: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    let mut tools: Vec<_> = policy.tools().collect();
    tools.sort_by(|a, b| a.name.cmp(&b.name));
    for tool in tools {
        if let Some(credential) = &tool.credential {
            used.entry(credential.as_str())
                .or_insert(tool.name.as_str());
        }
    }
    let mut errors = Vec::new();
    for (name, tool) in used {
        let files: Vec<String> = source
            .config
            .credentials
            .get(name)
            .map(|entry| entry.get_ref().secret_files())
            .unwrap_or_default()
            .iter()
            .map(|f| f.to_string_lossy().into_owned())
            .collect();
        let shown = files
            .iter()
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let loaded = running.iter().any(|r| r.name == name && r.loaded);
        if !loaded {
            errors.push(format!(
                "credential {name:?} (file {shown}), used by tool {tool:?}, was not loaded when \
                 the running broker started, and a reload does not load credentials: restart \
                 the broker instead (systemctl restart keyward-broker.service), once the unit \
                 has LoadCredential={}:...",
                files.first().map_or(name, String::as_str)
            ));
            continue;
        }
        let Some(dir) = dir else { continue };
        for file in &files {
            let path = dir.join(file);
            if let Err(e) = std::fs::symlink_metadata(&path) {
                if e.kind() == io::ErrorKind::NotFound {
                    errors.push(format!(
                        "credential {name:?}: its file {file:?} is not in {} (the running broker \
                         keeps the value it loaded, and its next start would fail): check the \
                         LoadCredential= line and that the file exists",
                        dir.display()
                    ));
                }
            }
        }
    }
    errors
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[broker]
socket = "/run/keyward/broker.sock"
socket_group = "keyward-clients"

[credential.gmail]
file = "gmail.token"

[credential.aws]
file = "aws.key"
"#;

    fn source() -> Source {
        Source::parse("broker.toml", CONFIG.to_owned()).unwrap()
    }

    #[test]
    fn sections_comments_continuations_and_resets() {
        let text = "[Unit]\nLoadCredential=not-here:/x\n[Service]\n# LoadCredential=c:/x\n\
                    LoadCredential=a:/etc/a\nLoadCredential=\\\n  b:/etc/b\n\
                    LoadCredential=\nLoadCredentialEncrypted=c:/etc/c.cred\n";
        let entries = parse_section(text, "Service");
        let (ids, _) = credential_ids(&entries);
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), ["c"]);
        let entries = parse_section(&text.replace("LoadCredential=\n", ""), "Service");
        let (ids, _) = credential_ids(&entries);
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn missing_and_extra_credentials_and_socket_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        let service = dir.path().join("keyward-broker.service");
        std::fs::write(
            &service,
            "[Service]\nExecStart=/bin/true\nLoadCredential=gmail.token:/etc/keyward/credentials/gmail.token\n",
        )
        .unwrap();
        // A drop-in, as `systemctl edit` writes it.
        std::fs::create_dir(dir.path().join("keyward-broker.service.d")).unwrap();
        std::fs::write(
            dir.path().join("keyward-broker.service.d/override.conf"),
            "[Service]\nLoadCredential=old.token:/etc/keyward/credentials/old.token\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("keyward-broker.socket"),
            "[Socket]\nListenSequentialPacket=/run/other.sock\nSocketMode=0666\n\
             SocketGroup=keyward-clients\n",
        )
        .unwrap();
        let found = compare(&source(), &service).unwrap();
        assert_eq!(found.errors.len(), 2, "{found:#?}");
        assert!(found.errors[0].contains("credential \"aws\""), "{found:#?}");
        assert!(
            found.errors[0].contains("LoadCredential=aws.key:"),
            "{found:#?}"
        );
        assert!(found.errors[1].contains("/run/other.sock"), "{found:#?}");
        assert!(
            found.errors[1].contains("/run/keyward/broker.sock"),
            "{found:#?}"
        );
        assert_eq!(found.warnings.len(), 2, "{found:#?}");
        assert!(found.warnings[0].contains("\"old.token\""), "{found:#?}");
        assert!(found.warnings[1].contains("SocketMode=0666"), "{found:#?}");

        // Everything in agreement: nothing to say.
        std::fs::remove_file(dir.path().join("keyward-broker.service.d/override.conf")).unwrap();
        std::fs::write(
            dir.path().join("keyward-broker.service.d/creds.conf"),
            "[Service]\nLoadCredentialEncrypted=aws.key\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("keyward-broker.socket"),
            "[Socket]\nListenSequentialPacket=/run/keyward/broker.sock\nSocketMode=0660\n",
        )
        .unwrap();
        let found = compare(&source(), &service).unwrap();
        assert!(
            found.errors.is_empty() && found.warnings.is_empty(),
            "{found:#?}"
        );

        // A stream socket is not one the broker can serve.
        std::fs::write(
            dir.path().join("keyward-broker.socket"),
            "[Socket]\nListenStream=/run/keyward/broker.sock\n",
        )
        .unwrap();
        let found = compare(&source(), &service).unwrap();
        assert!(found.errors[0].contains("ListenStream="), "{found:#?}");
    }

    #[test]
    fn a_reload_needs_credentials_the_running_broker_loaded_and_their_files() {
        let text = format!(
            "{CONFIG}\n[[tool]]\nname = \"mail\"\nkind = \"http\"\ncredential = \"gmail\"\n\
             method = \"GET\"\nurl = \"https://127.0.0.1:9/\"\nauth = {{ bearer = true }}\n\
             [[tool]]\nname = \"s3\"\nkind = \"http\"\ncredential = \"aws\"\n\
             method = \"GET\"\nurl = \"https://127.0.0.1:9/\"\nauth = {{ bearer = true }}\n"
        );
        let source = Source::parse("broker.toml", text).unwrap();
        let policy = Policy::compile(&source).unwrap();
        let running = |names: &[(&str, bool)]| -> Vec<Running> {
            names
                .iter()
                .map(|(n, loaded)| Running {
                    name: (*n).to_owned(),
                    loaded: *loaded,
                })
                .collect()
        };
        // Both loaded at start; no directory to look in: nothing to say.
        let both = running(&[("aws", true), ("gmail", true)]);
        assert!(compare_running(&source, &policy, &both, None).is_empty());
        // One named by the old policy but never loaded, one not known.
        for held in [running(&[("aws", false)]), running(&[])] {
            let errors = compare_running(&source, &policy, &held, None);
            assert_eq!(errors.len(), 2, "{errors:#?}");
            assert!(
                errors[0].starts_with(
                    "credential \"aws\" (file \"aws.key\"), used by tool \"s3\", was not loaded"
                ),
                "{errors:#?}"
            );
            assert!(errors[0].contains("LoadCredential=aws.key:"), "{errors:#?}");
            assert!(errors[1].starts_with("credential \"gmail\" (file \"gmail.token\")"));
        }
        // Loaded, but the file the next start reads is gone.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("aws.key"), "x").unwrap();
        let errors = compare_running(&source, &policy, &both, Some(dir.path()));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("credential \"gmail\": its file \"gmail.token\" is not in"),
            "{errors:#?}"
        );
        std::fs::write(dir.path().join("gmail.token"), "x").unwrap();
        assert!(compare_running(&source, &policy, &both, Some(dir.path())).is_empty());
    }

    #[test]
    fn the_shipped_units_agree_with_a_matching_config() {
        let systemd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
        let dir = tempfile::tempdir().unwrap();
        for unit in ["keyward-broker.service", "keyward-broker.socket"] {
            std::fs::copy(systemd.join(unit), dir.path().join(unit)).unwrap();
        }
        let text = "[broker]\nsocket = \"/run/keyward/broker.sock\"\n\
                    socket_group = \"keyward-clients\"\n";
        let source = Source::parse("broker.toml", text.to_owned()).unwrap();
        let found = compare(&source, &dir.path().join("keyward-broker.service")).unwrap();
        assert!(
            found.errors.is_empty() && found.warnings.is_empty(),
            "{found:#?}"
        );
    }
}
