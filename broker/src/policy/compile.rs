// SPDX-License-Identifier: Apache-2.0
//! Compiling a parsed configuration into a [`Policy`]: every check that
//! needs judgement, every error collected and located on the line that
//! sets the offending key.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{IdRef, Located, ParamConfig, ParamType, Source};
use crate::gateway::{Gateway, GatewayTool};
use crate::tool::{self, Defaults, Definition};

use super::{
    check_value, describe_rule, show_str, show_value, type_name, type_with_article, BrokerSettings,
    Failure, ParamSpec, Policy, Principal, Rule, Tool, TypedValue, MAX_RESPONSE_BYTES_LIMIT,
};

const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_RESPONSE_BYTES: usize = 60_000;
const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 32;

/// Compiled-program size cap for a parameter pattern, so that a pattern like
/// `\w{1000}{1000}` is an error at startup rather than a memory blow-up.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Check and compile a parsed configuration.
pub(super) fn compile(src: &Source) -> Result<Policy, Vec<Located>> {
    let mut errors = Vec::new();
    let broker = compile_broker(src, &mut errors);
    check_credentials(src, &mut errors);
    let principals = compile_principals(src, &mut errors);
    let mut tools = compile_tools(src, &broker, &mut errors);
    let gateways = compile_gateways(src, &mut tools, &mut errors);
    if errors.is_empty() {
        Ok(Policy {
            broker,
            principals,
            tools,
            source_hash: super::source_hash(src.text.as_bytes()),
            loaded_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            gateways,
        })
    } else {
        // Stable: errors of one line keep the order they were found in.
        errors.sort_by_key(|e| e.line);
        Err(errors)
    }
}

/// A regex error on one line: the regex crate draws a caret diagram over
/// several lines and ends with the actual error.
fn regex_error_summary(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().trim_start_matches("error: ").to_owned())
        .unwrap_or(text)
}

/// The span an error message is about, so that `params.to.pattern: ...`
/// points at the line that sets `params.to` rather than at the `[[tool]]`
/// header: the line within the entry that sets the key the message's field
/// path starts with, else the whole entry. Found by reading the text,
/// because toml's `Spanned` cannot see through dotted keys.
fn locate(src: &Source, entry: Range<usize>, message: &str) -> Range<usize> {
    let path = message.split(':').next().unwrap_or_default();
    let mut parts = path.split(['.', '[']);
    let first = parts.next().unwrap_or_default();
    if first.is_empty() {
        return entry;
    }
    if first == "params" {
        if let Some(span) = parts
            .next()
            .and_then(|param| find_key(&src.text, entry.clone(), &["params", param]))
        {
            return span;
        }
    }
    find_key(&src.text, entry.clone(), &[first]).unwrap_or(entry)
}

/// The first line in `within` that sets `keys` (bare keys joined by dots),
/// as `a.b = ...` or `a.b.c = ...`.
fn find_key(text: &str, within: Range<usize>, keys: &[&str]) -> Option<Range<usize>> {
    let mut offset = within.start;
    for line in text.get(within)?.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if sets_key(trimmed, keys) {
            let start = offset + (line.len() - trimmed.len());
            return Some(start..offset + line.len());
        }
        offset += line.len();
    }
    None
}

fn sets_key(line: &str, keys: &[&str]) -> bool {
    let mut rest = line;
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            match rest.trim_start().strip_prefix('.') {
                Some(r) => rest = r.trim_start(),
                None => return false,
            }
        }
        match rest.strip_prefix(key) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    let rest = rest.trim_start();
    rest.starts_with('=') || rest.starts_with('.')
}

/// `[broker]` is not spanned in the parsed config: find its header, and
/// the table runs to the next header.
fn broker_table(text: &str) -> Option<Range<usize>> {
    let mut offset = 0;
    let mut start = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        match start {
            None => {
                if let Some(rest) = trimmed.strip_prefix("[broker]") {
                    if rest.trim_start().is_empty() || rest.trim_start().starts_with('#') {
                        start = Some(offset);
                    }
                }
            }
            Some(s) if trimmed.starts_with('[') => return Some(s..offset),
            Some(_) => {}
        }
        offset += line.len();
    }
    start.map(|s| s..text.len())
}

fn compile_broker(src: &Source, errors: &mut Vec<Located>) -> BrokerSettings {
    let cfg = &src.config.broker;
    let table = broker_table(&src.text);
    let mut error = |field: &str, message: String| {
        let message = format!("{field}: {message}");
        errors.push(match &table {
            Some(table) => {
                let span = locate(src, table.clone(), &message);
                src.error_at(span, "broker", message)
            }
            None => Located {
                file: src.name.clone(),
                line: None,
                entry: "broker".to_owned(),
                message,
            },
        });
    };

    if cfg.socket.as_os_str().is_empty() {
        error("socket", "must not be empty".to_owned());
    }
    if let Some(key) = &cfg.signing_key {
        if !src.config.credentials.contains_key(key) {
            error(
                "signing_key",
                format!("{key:?} is not a defined [credential.NAME]"),
            );
        }
    }
    let socket_mode = parse_mode(&cfg.socket_mode).unwrap_or_else(|e| {
        error("socket_mode", e);
        0o660
    });
    let max_token_ttl = cfg.max_token_ttl.unwrap_or(DEFAULT_MAX_TOKEN_TTL);
    if max_token_ttl.is_zero() {
        error("max_token_ttl", "must be longer than zero".to_owned());
    }
    let call_timeout = cfg.call_timeout.unwrap_or(DEFAULT_CALL_TIMEOUT);
    if call_timeout.is_zero() {
        error("call_timeout", "must be longer than zero".to_owned());
    }
    let mut max_response_bytes = cfg.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
    if max_response_bytes == 0 || max_response_bytes > MAX_RESPONSE_BYTES_LIMIT {
        error(
            "max_response_bytes",
            format!(
                "{max_response_bytes} is out of range: must be 1 to {MAX_RESPONSE_BYTES_LIMIT} \
                 so that a response fits in one 64 KiB message"
            ),
        );
        max_response_bytes = DEFAULT_MAX_RESPONSE_BYTES;
    }
    let mut max_connections_per_uid = cfg
        .max_connections_per_uid
        .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_UID);
    if max_connections_per_uid == 0 {
        error(
            "max_connections_per_uid",
            "must be greater than zero".to_owned(),
        );
        max_connections_per_uid = DEFAULT_MAX_CONNECTIONS_PER_UID;
    }
    let token_limits = token_limits(cfg, &mut error);
    BrokerSettings {
        socket: cfg.socket.clone(),
        socket_mode,
        socket_group: cfg.socket_group.clone(),
        credentials_dir: cfg.credentials_dir.clone(),
        state_dir: cfg.state_dir.clone(),
        max_token_ttl,
        call_timeout,
        max_response_bytes,
        max_connections_per_uid,
        admin_uids: cfg.admin_uids.clone(),
        signing_key: cfg.signing_key.clone(),
        token_limits,
    }
}

/// The per-uid caps of the token state; zero is an error.
fn token_limits(
    cfg: &crate::config::BrokerConfig,
    error: &mut impl FnMut(&str, String),
) -> crate::state::Limits {
    let defaults = crate::state::Limits::default();
    let mut pick = |key: &str, value: Option<u32>, default: u32| match value {
        Some(0) => {
            error(key, "must be greater than zero".to_owned());
            default
        }
        Some(n) => n,
        None => default,
    };
    crate::state::Limits {
        live_per_uid: pick(
            "max_live_tokens_per_uid",
            cfg.max_live_tokens_per_uid,
            defaults.live_per_uid,
        ),
        attenuations_per_uid: pick(
            "max_attenuations_per_uid",
            cfg.max_attenuations_per_uid,
            defaults.attenuations_per_uid,
        ),
    }
}

/// `"0660"` → `0o660`: octal digits only, permission bits only.
pub(super) fn parse_mode(text: &str) -> Result<u32, String> {
    let octal =
        !text.is_empty() && text.len() <= 11 && text.bytes().all(|b| matches!(b, b'0'..=b'7'));
    let mode = if octal {
        u32::from_str_radix(text, 8).ok()
    } else {
        None
    };
    match mode {
        None => Err(format!("{text:?} is not an octal mode like \"0660\"")),
        Some(mode) if mode & !0o777 != 0 => Err(format!(
            "{text:?} sets bits beyond 0777 (setuid, setgid or sticky)"
        )),
        Some(mode) => Ok(mode),
    }
}

fn check_credentials(src: &Source, errors: &mut Vec<Located>) {
    for (name, entry) in &src.config.credentials {
        let label = format!("credential {name:?}");
        let mut error = |message: String| {
            let span = locate(src, entry.span(), &message);
            errors.push(src.error_at(span, label.clone(), message));
        };
        if name.is_empty() {
            error("the credential name must not be empty".to_owned());
        }
        let cfg = entry.get_ref();
        let aws_only = cfg.aws_fields_set();
        match cfg.kind.as_deref() {
            None => {
                for field in &aws_only {
                    error(format!("{field}: not allowed without kind = \"aws\""));
                }
                check_static_credential(cfg, &mut error)
            }
            Some(crate::credential::aws::KIND) => {
                crate::credential::aws::check(cfg)
                    .into_iter()
                    .for_each(&mut error);
                if let Some(field) = cfg.fields.keys().next() {
                    error(format!("{field}: not allowed for kind \"aws\""));
                }
                if let Some(file) = cfg.secret_access_key_file.as_deref() {
                    check_plain_file("secret_access_key_file", file, &mut error);
                }
            }
            Some(crate::credential::oauth::KIND) => {
                for field in &aws_only {
                    error(format!(
                        "{field}: not allowed for kind \"{}\"",
                        crate::credential::oauth::KIND
                    ));
                }
                for message in crate::credential::oauth::check_config(name, cfg) {
                    error(message);
                }
            }
            Some(other) => error(format!(
                "kind: {other:?} is not a credential kind (leave it out for a static secret, or \"{}\" or \"{}\")",
                crate::credential::aws::KIND,
                crate::credential::oauth::KIND
            )),
        }
    }
}

/// A static secret: `file` and nothing else.
fn check_static_credential(cfg: &crate::config::CredentialConfig, error: &mut impl FnMut(String)) {
    if let Some(field) = cfg.fields.keys().next() {
        error(format!(
            "{field}: not allowed for a static credential (no kind)"
        ));
    }
    let Some(file) = cfg.file.as_deref() else {
        error("file: is required (the file holding the secret)".to_owned());
        return;
    };
    check_plain_file("file", file, error);
}

/// A credential file is named relative to the credentials directory.
fn check_plain_file(field: &str, file: &Path, error: &mut impl FnMut(String)) {
    let file = file.as_os_str();
    let plain = match file.to_str() {
        Some(f) => !f.is_empty() && !f.contains(['/', '\0']) && f != "." && f != "..",
        None => false,
    };
    if !plain {
        error(format!(
            "{field}: {file:?} must be a plain file name (no \"/\", not \".\" or \"..\") \
             relative to the credentials directory"
        ));
    }
}

fn compile_principals(src: &Source, errors: &mut Vec<Located>) -> Vec<Principal> {
    let tool_names: std::collections::BTreeSet<&str> = src
        .config
        .tools
        .iter()
        .map(|t| t.get_ref().name.as_str())
        .chain(
            src.config
                .gateways
                .iter()
                .map(|g| g.get_ref().name.as_str()),
        )
        .collect();
    let mut first_line: BTreeMap<&str, usize> = BTreeMap::new();
    let mut principals = Vec::new();
    for (index, entry) in src.config.principals.iter().enumerate() {
        let cfg = entry.get_ref();
        let label = entry_label("principal", &cfg.name, index);
        let mut messages = Vec::new();
        if cfg.name.is_empty() {
            messages.push("name: must not be empty".to_owned());
        } else if let Some(line) = first_line.get(cfg.name.as_str()) {
            messages.push(format!(
                "name: a principal of this name is already defined on line {line}"
            ));
        } else {
            first_line.insert(&cfg.name, src.line_of(entry.span().start));
        }
        if cfg.uids.is_empty() && cfg.gids.is_empty() {
            messages.push("uids, gids: at least one uid or gid is required".to_owned());
        }
        let uids = resolve_ids("uids", &cfg.uids, resolve_user, &mut messages);
        let gids = resolve_ids("gids", &cfg.gids, resolve_group, &mut messages);
        for (field, list) in [
            ("may_call", &cfg.may_call),
            ("may_delegate", &cfg.may_delegate),
        ] {
            for tool in list {
                if !tool_names.contains(tool.as_str()) {
                    messages.push(format!("{field}: {tool:?} is not a defined tool"));
                }
            }
        }
        let ok = messages.is_empty();
        for message in messages {
            let span = locate(src, entry.span(), &message);
            errors.push(src.error_at(span, label.clone(), message));
        }
        if ok {
            principals.push(Principal {
                name: cfg.name.clone(),
                uids,
                gids,
                may_call: cfg.may_call.clone(),
                may_delegate: cfg.may_delegate.clone(),
            });
        }
    }
    principals
}

/// Numbers as they are, names looked up (in the user or group database,
/// at every load and reload); an unknown name is an error of `field`.
fn resolve_ids(
    field: &str,
    ids: &[IdRef],
    lookup: fn(&str) -> Result<Option<u32>, String>,
    messages: &mut Vec<String>,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match id {
            IdRef::Id(n) => out.push(*n),
            IdRef::Name(name) => match lookup(name) {
                Ok(Some(n)) => out.push(n),
                Ok(None) => messages.push(format!("{field}: {name:?} is not a known name")),
                Err(e) => messages.push(format!("{field}: looking up {name:?}: {e}")),
            },
        }
    }
    out
}

fn resolve_user(name: &str) -> Result<Option<u32>, String> {
    nix::unistd::User::from_name(name)
        .map(|u| u.map(|u| u.uid.as_raw()))
        .map_err(|e| e.to_string())
}

fn resolve_group(name: &str) -> Result<Option<u32>, String> {
    nix::unistd::Group::from_name(name)
        .map(|g| g.map(|g| g.gid.as_raw()))
        .map_err(|e| e.to_string())
}

/// `tool "send_email"`, or `tool #3` for an entry without a name.
fn entry_label(kind: &str, name: &str, index: usize) -> String {
    if name.is_empty() {
        format!("{kind} #{}", index + 1)
    } else {
        format!("{kind} {name:?}")
    }
}

fn compile_tools(
    src: &Source,
    settings: &BrokerSettings,
    errors: &mut Vec<Located>,
) -> BTreeMap<String, Arc<Tool>> {
    let mut first_line: BTreeMap<&str, usize> = BTreeMap::new();
    let mut tools = BTreeMap::new();
    for (index, entry) in src.config.tools.iter().enumerate() {
        let cfg = entry.get_ref();
        let label = entry_label("tool", &cfg.name, index);
        let mut messages = Vec::new();

        if !valid_tool_name(&cfg.name) {
            messages.push(format!(
                "name: {:?} is not a valid tool name (1 to 64 of a-z 0-9 _ . -)",
                cfg.name
            ));
        } else if let Some(line) = first_line.get(cfg.name.as_str()) {
            messages.push(format!(
                "name: a tool of this name is already defined on line {line}"
            ));
        } else {
            first_line.insert(&cfg.name, src.line_of(entry.span().start));
        }

        let params = compile_params(&cfg.params, &mut messages);

        let action = match tool::kind(&cfg.kind) {
            Some(kind) => {
                let definition = Definition {
                    name: &cfg.name,
                    kind: kind.name,
                    credential: cfg.credential.as_deref(),
                    params: &params,
                    fields: &cfg.fields,
                    defaults: Defaults {
                        timeout: settings.call_timeout,
                        max_response_bytes: settings.max_response_bytes,
                    },
                };
                (kind.compile)(&definition)
                    .map_err(|kind_messages| messages.extend(kind_messages))
                    .ok()
            }
            None => {
                messages.push(format!(
                    "kind: {:?} is not a kind of tool (one of {})",
                    cfg.kind,
                    tool::kind_names()
                ));
                None
            }
        };

        // Unless the kind refused the field already.
        if let Some(credential) = &cfg.credential {
            match src.config.credentials.get(credential) {
                None if !messages.iter().any(|m| m.starts_with("credential:")) => {
                    messages.push(format!(
                        "credential: {credential:?} is not defined by any [credential.NAME] entry"
                    ));
                }
                // An AWS key is only for tools that sign with it: sent as a
                // bearer or header it would go to the upstream whole.
                Some(entry) => {
                    let is_aws =
                        entry.get_ref().kind.as_deref() == Some(crate::credential::aws::KIND);
                    let wants_aws = action.as_ref().is_some_and(|a| a.uses_aws_key());
                    if is_aws != wants_aws && action.is_some() {
                        messages.push(if is_aws {
                            format!(
                                "credential: {credential:?} is an AWS key (kind = \"aws\"); only \
                                 auth = {{ aws_sigv4 = ... }} and kind = \"aws_sts\" may use it"
                            )
                        } else {
                            format!(
                                "credential: {credential:?} is not an AWS key; this tool signs \
                                 with one (kind = \"aws\")"
                            )
                        });
                    }
                }
                None => {}
            }
            // A token credential has no fixed value to put in an
            // environment, a file or a connection string.
            let kind = src
                .config
                .credentials
                .get(credential)
                .and_then(|c| c.get_ref().kind.clone());
            if kind.as_deref() == Some(crate::credential::oauth::KIND) && cfg.kind != "http" {
                messages.push(format!(
                    "credential: {credential:?} is an oauth2 credential, which only http tools can use"
                ));
            }
        }

        match action {
            Some(action) if messages.is_empty() => {
                let tool = Tool {
                    name: cfg.name.clone(),
                    description: cfg.description.clone(),
                    credential: cfg.credential.clone(),
                    params,
                    action,
                };
                tools.insert(cfg.name.clone(), Arc::new(tool));
            }
            _ => {
                for message in messages {
                    let span = locate(src, entry.span(), &message);
                    errors.push(src.error_at(span, label.clone(), message));
                }
            }
        }
    }
    tools
}

/// Each `[[gateway]]`: compiled, and entered in `tools` under its name (a
/// name no tool has) so that principals and tokens grant it like a tool.
fn compile_gateways(
    src: &Source,
    tools: &mut BTreeMap<String, Arc<Tool>>,
    errors: &mut Vec<Located>,
) -> BTreeMap<String, Arc<Gateway>> {
    let mut gateways = BTreeMap::new();
    for (index, entry) in src.config.gateways.iter().enumerate() {
        let cfg = entry.get_ref();
        let label = entry_label("gateway", &cfg.name, index);
        let mut messages = Vec::new();
        if !valid_tool_name(&cfg.name) {
            messages.push(format!(
                "name: {:?} is not a valid gateway name (1 to 64 of a-z 0-9 _ . -)",
                cfg.name
            ));
        } else if tools.contains_key(&cfg.name) || gateways.contains_key(&cfg.name) {
            messages.push(format!(
                "name: a tool or gateway named {:?} is already defined",
                cfg.name
            ));
        }
        if let Some(credential) = &cfg.credential {
            if !src.config.credentials.contains_key(credential) {
                messages.push(format!(
                    "credential: {credential:?} is not defined by any [credential.NAME] entry"
                ));
            }
        }
        match Gateway::compile(cfg) {
            Ok(gateway) if messages.is_empty() => {
                let tool = Tool {
                    name: cfg.name.clone(),
                    description: Some(cfg.description.clone().unwrap_or_else(|| {
                        format!(
                            "HTTP gateway to {} (agent-shim run --gateway)",
                            cfg.upstream
                        )
                    })),
                    credential: cfg.credential.clone(),
                    params: Gateway::params(),
                    action: Box::new(GatewayTool::new(&gateway)),
                };
                tools.insert(cfg.name.clone(), Arc::new(tool));
                gateways.insert(cfg.name.clone(), Arc::new(gateway));
            }
            result => {
                if let Err(gateway_messages) = result {
                    messages.extend(gateway_messages);
                }
                for message in messages {
                    let span = locate(src, entry.span(), &message);
                    errors.push(src.error_at(span, label.clone(), message));
                }
            }
        }
    }
    gateways
}

/// `^[a-z0-9_.-]{1,64}$`
pub(super) fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
}

/// `^[a-z_][a-z0-9_]{0,63}$`
pub(super) fn valid_param_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && name.len() <= 64
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

/// Every parameter, each compiled as far as it goes: a parameter with an
/// error is still in the map (with the rules that did compile) so that the
/// http compiler does not also report its placeholders as unknown; the
/// policy as a whole fails on `messages`.
fn compile_params(
    configs: &BTreeMap<String, ParamConfig>,
    messages: &mut Vec<String>,
) -> BTreeMap<String, ParamSpec> {
    let mut params = BTreeMap::new();
    for (name, cfg) in configs {
        if !valid_param_name(name) {
            messages.push(format!(
                "params.{name:?}: not a valid parameter name (a-z or _, then up to 63 of a-z 0-9 _)"
            ));
        }
        let spec = compile_param(&format!("params.{name}"), cfg, messages);
        params.insert(name.clone(), spec);
    }
    params
}

fn compile_param(path: &str, cfg: &ParamConfig, messages: &mut Vec<String>) -> ParamSpec {
    let ty = cfg.ty;
    let is_path = ty == ParamType::Path;
    let is_string = ty == ParamType::String || is_path;
    let is_int = ty == ParamType::Int;
    let mut not_for_type = |field: &str| {
        messages.push(format!(
            "{path}.{field}: not allowed for a parameter of type {}",
            type_name(ty)
        ));
    };

    // Cheap rules first; the segment rules (many decodings and
    // normalisations) and the pattern, the costliest, run on a string
    // max_len has already bounded.
    let mut rules = Vec::new();
    let mut prefix_error = None;
    if let Some(n) = cfg.max_len {
        if is_string {
            rules.push(Rule::MaxLen(n));
        } else {
            not_for_type("max_len");
        }
    }
    if is_path {
        rules.push(Rule::Segments);
    }
    if let Some(prefix) = &cfg.prefix {
        if is_path {
            match super::path::canonical_prefix(prefix) {
                Ok(p) => rules.push(Rule::PathPrefix(p)),
                Err(fault) => {
                    prefix_error = Some(format!(
                        "{path}.prefix: {} is not a prefix of whole path segments: it {}",
                        if cfg.secret {
                            "[secret]".to_owned()
                        } else {
                            show_str(prefix)
                        },
                        fault.describe(true)
                    ))
                }
            }
        } else if is_string {
            rules.push(Rule::Prefix(prefix.clone()));
        } else {
            not_for_type("prefix");
        }
    }
    let mut one_of = None;
    if let Some(values) = &cfg.one_of {
        if is_string || is_int {
            one_of = Some(values);
        } else {
            not_for_type("one_of");
        }
    }
    if let Some(min) = cfg.min {
        if is_int {
            rules.push(Rule::Min(min));
        } else {
            not_for_type("min");
        }
    }
    if let Some(max) = cfg.max {
        if is_int {
            rules.push(Rule::Max(max));
        } else {
            not_for_type("max");
        }
    }
    let mut pattern = None;
    if let Some(p) = &cfg.pattern {
        if is_string {
            pattern = Some(p);
        } else {
            not_for_type("pattern");
        }
    }

    messages.extend(prefix_error);
    if let (true, Some(min), Some(max)) = (is_int, cfg.min, cfg.max) {
        if min > max {
            messages.push(format!("{path}.min: {min} is greater than max {max}"));
        }
    }
    if let Some(values) = one_of {
        if values.is_empty() {
            messages.push(format!("{path}.one_of: must list at least one value"));
        }
        let mut typed = Vec::new();
        for (i, value) in values.iter().enumerate() {
            match from_toml(ty, value) {
                Some(v) => typed.push(v),
                None => messages.push(format!(
                    "{path}.one_of[{i}]: must be {}",
                    type_with_article(ty)
                )),
            }
        }
        rules.push(Rule::OneOf(typed));
    }
    if let Some(p) = pattern {
        match compile_pattern(p) {
            Ok(re) => rules.push(Rule::Pattern(re)),
            Err(e) => messages.push(format!(
                "{path}.pattern: invalid regex: {}",
                regex_error_summary(&e)
            )),
        }
    }

    let mut default = None;
    if let Some(value) = &cfg.default {
        match from_toml(ty, value) {
            None => messages.push(format!("{path}.default: must be {}", type_with_article(ty))),
            Some(v) => match check_value(&rules, &v) {
                Ok(()) => default = Some(v),
                Err(Failure::Nul) => {
                    messages.push(format!("{path}.default: contains a NUL byte"));
                }
                Err(Failure::Path(fault)) => messages.push(format!(
                    "{path}.default: {} {}",
                    show_value(&v, cfg.secret),
                    fault.describe(true)
                )),
                Err(Failure::Rule(rule)) => messages.push(format!(
                    "{path}.default: {} {}",
                    show_value(&v, cfg.secret),
                    describe_rule(rule, cfg.secret)
                )),
            },
        }
    }

    ParamSpec {
        ty,
        rules,
        default,
        secret: cfg.secret,
    }
}

fn from_toml(ty: ParamType, value: &toml::Value) -> Option<TypedValue> {
    match (ty, value) {
        (ParamType::String | ParamType::Path, toml::Value::String(s)) => {
            Some(TypedValue::Str(s.clone()))
        }
        (ParamType::Int, toml::Value::Integer(i)) => Some(TypedValue::Int(*i)),
        (ParamType::Bool, toml::Value::Boolean(b)) => Some(TypedValue::Bool(*b)),
        _ => None,
    }
}

/// Compile a pattern to match the whole string, within [`REGEX_SIZE_LIMIT`].
/// The admin's own text is compiled first so that a syntax error points
/// into what they wrote, not into our `^(?:...)$` wrapper.
pub(crate) fn compile_pattern(pattern: &str) -> Result<regex::Regex, regex::Error> {
    let build = |p: &str| {
        regex::RegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
    };
    build(pattern)?;
    build(&format!("^(?:{pattern})$"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_util::{call, errors, one_error, policy, s, source, BROKER};
    use super::super::{Caller, TypedValue};
    use super::*;

    #[test]
    fn compiles_with_defaults() {
        let p = Policy::compile(&source(BROKER)).expect("minimal config compiles");
        assert_eq!(p.broker.socket_mode, 0o660);
        assert_eq!(p.broker.max_token_ttl, Duration::from_secs(900));
        assert_eq!(p.broker.call_timeout, Duration::from_secs(30));
        assert_eq!(p.broker.max_response_bytes, 60_000);
        assert_eq!(p.broker.max_connections_per_uid, 32);
        assert_eq!(p.tools().count(), 0);
    }

    #[test]
    fn compiles_the_test_policy() {
        let p = policy();
        let mail = p.tool("mail").expect("mail tool");
        assert_eq!(mail.action.kind(), "echo");
        assert!(mail.params["key"].secret);
        assert_eq!(
            mail.params["subject"].default,
            Some(TypedValue::Str("hi".into()))
        );
        assert_eq!(p.tools().count(), 4);
    }

    #[test]
    fn all_errors_are_collected_and_located() {
        let text = r#"[broker]
socket = "/tmp/k.sock"
socket_mode = "0999"

[[principal]]
name = "a"
uids = [1]
may_call = ["nope"]

[[tool]]
name = "t"
kind = "echo"
params.n = { type = "int", pattern = "x" }
"#;
        let errs = errors(text);
        let got: Vec<(Option<usize>, &str)> =
            errs.iter().map(|e| (e.line, e.entry.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(3), "broker"),
                (Some(8), "principal \"a\""),
                (Some(13), "tool \"t\""),
            ],
            "{errs:#?}"
        );
        assert!(errs[0].message.starts_with("socket_mode: "), "{}", errs[0]);
        assert!(errs[1].message.contains("\"nope\""), "{}", errs[1]);
        assert!(
            errs[2].message.starts_with("params.n.pattern: "),
            "{}",
            errs[2]
        );
        assert_eq!(errs[2].file, "t.toml");
        assert_eq!(
            errs[2].to_string(),
            "t.toml:13: tool \"t\": params.n.pattern: not allowed for a parameter of type int"
        );
    }

    /// Users and groups by name are looked up (here: root and the groups
    /// every system has); a supplementary group matches `gids` as well as
    /// the primary one; an unknown name is a located error.
    #[test]
    fn principals_by_name_and_supplementary_groups() {
        let text = format!(
            "{BROKER}[[principal]]\nname = \"admins\"\nuids = [\"root\", 7]\n\
             gids = [\"root\", 4242]\n"
        );
        let p = Policy::compile(&source(&text)).expect("compiles");
        let admins = p.principal("admins").unwrap();
        assert_eq!(admins.uids, [0, 7]);
        assert_eq!(admins.gids, [0, 4242]);
        let in_supplementary = Caller {
            uid: 5000,
            gid: 5000,
            groups: vec![100, 4242],
        };
        assert_eq!(p.principals_of(&in_supplementary).count(), 1);
        assert_eq!(p.principals_of(&Caller::new(5000, 5000)).count(), 0);
        assert_eq!(p.principals_of(&Caller::new(5000, 4242)).count(), 1);

        let text = format!(
            "{BROKER}[[principal]]\nname = \"x\"\n\
             uids = [\"no-such-user-kw\"]\ngids = [\"no-such-group-kw\"]\n"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert_eq!(errs[0].line, Some(5), "{errs:#?}");
        assert!(
            errs[0]
                .message
                .contains("uids: \"no-such-user-kw\" is not a known name"),
            "{}",
            errs[0]
        );
        assert_eq!(errs[1].line, Some(6), "{errs:#?}");
        assert!(
            errs[1].message.contains("gids: \"no-such-group-kw\""),
            "{}",
            errs[1]
        );
    }

    /// Table test: (config after `[broker]`, expected line, expected entry,
    /// text the message must contain).
    #[test]
    fn compile_errors() {
        let cases: &[(&str, usize, &str, &str)] = &[
            // broker
            ("socket_mode = \"660x\"", 3, "broker", "socket_mode: \"660x\" is not an octal"),
            ("socket_mode = \"\"", 3, "broker", "socket_mode:"),
            ("socket_mode = \"4755\"", 3, "broker", "beyond 0777"),
            ("max_response_bytes = 0", 3, "broker", "max_response_bytes: 0 is out of range"),
            ("max_response_bytes = 61441", 3, "broker", "max_response_bytes: 61441"),
            ("max_connections_per_uid = 0", 3, "broker", "max_connections_per_uid:"),
            ("max_token_ttl = \"0s\"", 3, "broker", "max_token_ttl:"),
            ("call_timeout = \"0s\"", 3, "broker", "call_timeout:"),
            // principals
            ("[[principal]]\nname = \"\"\nuids = [1]", 4, "principal #1", "name: must not be empty"),
            ("[[principal]]\nname = \"p\"", 3, "principal \"p\"", "at least one uid or gid"),
            (
                "[[principal]]\nname = \"p\"\nuids = [1]\n[[principal]]\nname = \"p\"\ngids = [1]",
                7,
                "principal \"p\"",
                "already defined on line 3",
            ),
            ("[[principal]]\nname = \"p\"\nuids = [1]\nmay_delegate = [\"x\"]", 6, "principal \"p\"", "may_delegate: \"x\" is not a defined tool"),
            // credentials
            ("[credential.c]\nfile = \"../x\"", 4, "credential \"c\"", "file: \"../x\" must be a plain file name"),
            ("[credential.c]\nfile = \"/etc/shadow\"", 4, "credential \"c\"", "plain file name"),
            ("[credential.c]\nfile = \"..\"", 4, "credential \"c\"", "plain file name"),
            ("[credential.c]\nfile = \"\"", 4, "credential \"c\"", "plain file name"),
            ("[credential.c]\nkind = \"aws\"\nsecret_access_key_file = \"s\"", 3, "credential \"c\"", "access_key_id: is required for kind \"aws\""),
            ("[credential.c]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_access_key_file = \"../s\"", 6, "credential \"c\"", "secret_access_key_file: \"../s\" must be a plain file name"),
            ("[credential.c]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_access_key_file = \"s\"\nendpoint = \"ftp://x\"", 7, "credential \"c\"", "endpoint: \"ftp://x\" is not an http(s) URL"),
            ("[credential.c]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_access_key_file = \"s\"\nfile = \"f\"", 7, "credential \"c\"", "file: not allowed for kind \"aws\""),
            ("[credential.c]\nfile = \"f\"\nregion = \"us-east-1\"", 5, "credential \"c\"", "region: not allowed without kind = \"aws\""),
            ("[credential.c]\nkind = \"gcp\"\nfile = \"f\"", 4, "credential \"c\"", "kind: \"gcp\" is not a credential kind"),
            ("[credential.c]", 3, "credential \"c\"", "file: is required"),
            // AWS keys are for signing tools only, and those need one.
            ("[credential.c]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_access_key_file = \"s\"\n[[tool]]\nname = \"t\"\nkind = \"http\"\ncredential = \"c\"\nmethod = \"GET\"\nurl = \"https://h/\"\nauth = { bearer = true }", 10, "tool \"t\"", "credential: \"c\" is an AWS key"),
            ("[credential.c]\nfile = \"f\"\n[[tool]]\nname = \"t\"\nkind = \"aws_sts\"\ncredential = \"c\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"", 8, "tool \"t\"", "credential: \"c\" is not an AWS key"),
            ("[credential.c]\nfile = \"f\"\n[[tool]]\nname = \"t\"\nkind = \"http\"\ncredential = \"c\"\nmethod = \"GET\"\nurl = \"https://h/\"\nauth = { aws_sigv4 = { service = \"s3\" } }", 8, "tool \"t\"", "credential: \"c\" is not an AWS key"),
            // aws_sts
            ("[[tool]]\nname = \"t\"\nkind = \"aws_sts\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"", 3, "tool \"t\"", "credential: is required for kind \"aws_sts\""),
            ("[credential.c]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_access_key_file = \"s\"\n[[tool]]\nname = \"t\"\nkind = \"aws_sts\"\ncredential = \"c\"", 7, "tool \"t\"", "session_policy: is required without role_arn"),
            ("[credential.c]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_access_key_file = \"s\"\n[[tool]]\nname = \"t\"\nkind = \"aws_sts\"\ncredential = \"c\"\nrole_arn = \"arn:aws:iam::1:role/r\"", 11, "tool \"t\"", "role_arn: \"arn:aws:iam::1:role/r\" is not an IAM role ARN"),
            ("[credential.c]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_access_key_file = \"s\"\n[[tool]]\nname = \"t\"\nkind = \"aws_sts\"\ncredential = \"c\"\nsession_policy = '{\"R\":\"{k}\"}'", 11, "tool \"t\"", "session_policy: placeholder {k} names no parameter"),
            ("[credential.c]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_access_key_file = \"s\"\n[[tool]]\nname = \"t\"\nkind = \"aws_sts\"\ncredential = \"c\"\nsession_policy = '{'", 11, "tool \"t\"", "session_policy: is not JSON"),
            ("[credential.c]\nkind = \"aws\"\naccess_key_id = \"AKIAIOSFODNN7EXAMPLE\"\nsecret_access_key_file = \"s\"\n[[tool]]\nname = \"t\"\nkind = \"aws_sts\"\ncredential = \"c\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\nmax_duration = \"5m\"", 12, "tool \"t\"", "max_duration: 300 s is not between"),
            ("[credential.o]\nkind = \"oauth2\"\ntoken_url = \"https://x/\"\nclient_id = \"x\"\nrefresh_token_file = \"r\"\n[[tool]]\nname = \"t\"\nkind = \"exec\"\ncredential = \"o\"\nprogram = \"/bin/true\"\ncredential_env = \"TOKEN\"", 11, "tool \"t\"", "credential: \"o\" is an oauth2 credential, which only http tools can use"),
            ("[credential.c]\nkind = \"vault\"", 4, "credential \"c\"", "kind: \"vault\" is not a credential kind"),
            ("[credential.c]\nfile = \"a\"\nclient_id = \"x\"", 5, "credential \"c\"", "client_id: not allowed for a static credential"),
            ("[credential.c]\nkind = \"oauth2\"\nclient_id = \"x\"\nrefresh_token_file = \"r\"", 3, "credential \"c\"", "token_url: is required"),
            ("[credential.c]\nkind = \"oauth2\"\ntoken_url = \"https://x/\"\nclient_id = \"x\"", 3, "credential \"c\"", "refresh_token_file: is required"),
            // tools
            ("[[tool]]\nname = \"Bad\"\nkind = \"echo\"", 4, "tool \"Bad\"", "name: \"Bad\" is not a valid tool name"),
            ("[[tool]]\nname = \"\"\nkind = \"echo\"", 4, "tool #1", "name:"),
            (
                "[[tool]]\nname = \"t\"\nkind = \"echo\"\n[[tool]]\nname = \"t\"\nkind = \"echo\"",
                7,
                "tool \"t\"",
                "already defined on line 3",
            ),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\ncredential = \"c\"", 6, "tool \"t\"", "credential: not allowed for kind \"echo\""),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nurl = \"https://x\"", 6, "tool \"t\"", "url: not allowed for kind \"echo\""),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nheaders = { a = \"b\" }", 6, "tool \"t\"", "headers: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\ntimeout = \"1s\"", 6, "tool \"t\"", "timeout: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nmax_response_bytes = 5", 6, "tool \"t\"", "max_response_bytes: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nmethod = \"GET\"", 6, "tool \"t\"", "method: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nauth = { bearer = true }", 6, "tool \"t\"", "auth: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nbody_json = { a = 1 }", 6, "tool \"t\"", "body_json: not allowed"),
            // params
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.Bad = { type = \"string\" }", 6, "tool \"t\"", "params.\"Bad\": not a valid parameter name"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.9a = { type = \"string\" }", 6, "tool \"t\"", "not a valid parameter name"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", min = 1 }", 6, "tool \"t\"", "params.a.min: not allowed for a parameter of type string"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", max_len = 1 }", 6, "tool \"t\"", "params.a.max_len: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", prefix = \"x\" }", 6, "tool \"t\"", "params.a.prefix: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"bool\", one_of = [true] }", 6, "tool \"t\"", "params.a.one_of: not allowed for a parameter of type bool"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"bool\", max = 1 }", 6, "tool \"t\"", "params.a.max: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", min = 5, max = 1 }", 6, "tool \"t\"", "params.a.min: 5 is greater than max 1"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", one_of = [1, \"2\"] }", 6, "tool \"t\"", "params.a.one_of[1]: must be an int"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", one_of = [] }", 6, "tool \"t\"", "params.a.one_of: must list at least one value"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", pattern = \"a)(\" }", 6, "tool \"t\"", "params.a.pattern: invalid regex"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", pattern = '\\w{1000}{1000}' }", 6, "tool \"t\"", "params.a.pattern: invalid regex"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", default = \"1\" }", 6, "tool \"t\"", "params.a.default: must be an int"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", max = 3, default = 4 }", 6, "tool \"t\"", "params.a.default: 4 is greater than the max of 3"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", pattern = \"[a-z]+\", default = \"A\" }", 6, "tool \"t\"", "params.a.default: \"A\" does not match the pattern"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", default = \"a\\u0000\" }", 6, "tool \"t\"", "params.a.default: contains a NUL byte"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", one_of = [\"x\"], default = \"hunter2\", secret = true }", 6, "tool \"t\"", "params.a.default: [secret] is not one of the allowed values"),
            // A key outside the entry's own lines: the error is on the entry.
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\n[tool.params.a]\ntype = \"bool\"\nmin = 1", 3, "tool \"t\"", "params.a.min"),
        ];
        for (body, line, entry, needle) in cases {
            let text = format!("{BROKER}{body}\n");
            let e = one_error(&text);
            assert!(
                e.line == Some(*line) && e.entry == *entry && e.message.contains(needle),
                "for config:\n{text}\ngot: {e}\nwant: line {line}, {entry}, containing {needle:?}"
            );
        }
    }

    #[test]
    fn gateways_compile_as_tools_and_their_errors_are_located() {
        const GW: &str = "[credential.k]\nfile = \"k\"\n[[gateway]]\nname = \"g\"\n\
                          upstream = \"https://api.example.com\"\ncredential = \"k\"\n\
                          auth = { bearer = true }\n\
                          allow = [ { method = \"POST\", path = \"/v1/x\" } ]\n";
        let text = format!(
            "{BROKER}{GW}[[principal]]\nname = \"p\"\nuids = [1]\nmay_delegate = [\"g\"]\n"
        );
        let p = Policy::compile(&source(&text)).unwrap_or_else(|e| panic!("{e:#?}"));
        let tool = p.tool("g").unwrap();
        assert_eq!(tool.action.kind(), "gateway");
        assert_eq!(
            tool.params.keys().collect::<Vec<_>>(),
            ["method", "path"],
            "granted on method and path"
        );
        assert!(p.gateway("g").is_some());

        for (extra, entry, needle) in [
            (
                "[[tool]]\nname = \"g\"\nkind = \"echo\"\n",
                "gateway \"g\"",
                "a tool or gateway named \"g\" is already defined",
            ),
            (
                "[[gateway]]\nname = \"h\"\nupstream = \"https://x\"\ncredential = \"nope\"\n\
                 auth = { bearer = true }\nallow = [ { method = \"GET\", path = \"/a\" } ]\n",
                "gateway \"h\"",
                "credential: \"nope\" is not defined",
            ),
            (
                "[[gateway]]\nname = \"h\"\nupstream = \"https://x\"\n\
                 allow = [ { method = \"GET\", path = \"/a/../b\" } ]\n",
                "gateway \"h\"",
                "allow[0].path",
            ),
        ] {
            let text = format!("{BROKER}{GW}{extra}");
            let e = one_error(&text);
            assert!(
                e.entry == entry && e.message.contains(needle),
                "for config:\n{text}\ngot: {e}"
            );
        }
    }

    #[test]
    fn example_compiles() {
        let src = source(crate::config::EXAMPLE);
        let p = Policy::compile(&src).unwrap_or_else(|e| panic!("{e:#?}"));
        let weather = p.tool("weather").expect("weather tool");
        assert_eq!(weather.action.kind(), "http");
        assert_eq!(weather.credential.as_deref(), Some("example_api"));
    }

    #[test]
    fn http_errors_are_located_on_their_field() {
        let text = format!(
            "{BROKER}[credential.api]\nfile = \"api.token\"\n\
             [[tool]]\nname = \"h\"\nkind = \"http\"\ncredential = \"nope\"\n\
             method = \"GET\"\nurl = \"https://example.com/{{missing}}\"\n\
             auth = {{ bearer = true }}\nparams.a = {{ type = \"int\", max_len = 3 }}\n"
        );
        let errs = errors(&text);
        let got: Vec<(Option<usize>, &str)> = errs
            .iter()
            .map(|e| (e.line, e.message.split(':').next().unwrap_or_default()))
            .collect();
        assert_eq!(
            got,
            [
                (Some(8), "credential"),
                (Some(10), "url"),
                (Some(12), "params.a.max_len"),
            ],
            "{errs:#?}"
        );
        assert!(errs.iter().all(|e| e.entry == "tool \"h\""), "{errs:#?}");
    }

    #[test]
    fn secret_default_is_never_shown() {
        let text = format!(
            "{BROKER}[[tool]]\nname = \"t\"\nkind = \"echo\"\n\
             params.a = {{ type = \"string\", prefix = \"sk-\", default = \"hunter2\", secret = true }}\n"
        );
        let e = one_error(&text).to_string();
        assert!(!e.contains("hunter2") && !e.contains("sk-"), "{e}");
    }

    #[test]
    fn pattern_is_anchored() {
        let text = format!(
            "{BROKER}[[principal]]\nname = \"p\"\nuids = [1]\nmay_call = [\"t\"]\n\
             [[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = {{ type = \"string\", pattern = \"b|c\" }}\n"
        );
        let p = Policy::compile(&source(&text)).expect("compiles");
        let caller = Caller::new(1, 1);
        for (value, ok) in [
            ("b", true),
            ("c", true),
            ("abc", false),
            ("bc", false),
            ("", false),
        ] {
            let r = p.authorize(&caller, &call("t", &[("a", s(value))]));
            assert_eq!(r.is_ok(), ok, "{value:?}: {r:?}");
        }
    }

    #[test]
    fn mode_parsing() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0777"), Ok(0o777));
        for bad in [
            "",
            "0o660",
            "+660",
            "-660",
            " 660",
            "8",
            "1777",
            "077777777777777",
        ] {
            assert!(parse_mode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn name_rules() {
        assert!(valid_tool_name("send_email.v2-x"));
        assert!(valid_tool_name(&"a".repeat(64)));
        assert!(!valid_tool_name(&"a".repeat(65)));
        for bad in ["", "A", "a b", "a/b", "é"] {
            assert!(!valid_tool_name(bad), "{bad:?}");
        }
        assert!(valid_param_name("_x9"));
        assert!(valid_param_name(&"a".repeat(64)));
        for bad in ["", "9a", "a-b", "a.b", "A", &"a".repeat(65)] {
            assert!(!valid_param_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn path_param_errors() {
        let compile_err = |params: &str| {
            one_error(&format!(
                "{BROKER}[[tool]]\nname = \"t\"\nkind = \"echo\"\n{params}\n"
            ))
            .message
        };
        let e = compile_err("params.f = { type = \"path\", prefix = \"a/../b\" }");
        assert!(
            e.contains("params.f.prefix") && e.contains("whole path segments"),
            "{e}"
        );
        let e = compile_err("params.f = { type = \"path\", default = \"../etc\" }");
        assert!(
            e.contains("params.f.default") && e.contains("\"..\" segment"),
            "{e}"
        );
        let e = compile_err("params.f = { type = \"path\", min = 1 }");
        assert!(
            e.contains("not allowed for a parameter of type path"),
            "{e}"
        );
    }
}
