// SPDX-License-Identifier: Apache-2.0
//! The documentation of every key of `broker.toml`, kept beside
//! [`crate::config`], from which `broker.toml(5)` is generated
//! ([`crate::manual`]). A test checks it against what the parser accepts,
//! so a key added to `config.rs` without a line here fails the build's
//! tests.

/// One key of a table.
#[derive(Debug)]
pub struct Key {
    pub name: &'static str,
    /// The TOML type, as a reader needs it (`string`, `"15m"`, `[uid]`...).
    pub ty: &'static str,
    /// The default, if the key is optional and has one worth stating.
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// One table (`[broker]`) or array of tables (`[[tool]]`).
#[derive(Debug)]
pub struct Section {
    pub header: &'static str,
    pub doc: &'static str,
    pub keys: &'static [Key],
}

const fn key(
    name: &'static str,
    ty: &'static str,
    default: Option<&'static str>,
    doc: &'static str,
) -> Key {
    Key {
        name,
        ty,
        default,
        doc,
    }
}

/// What the page says first.
pub const DESCRIPTION: &str = "The configuration of keyward-broker(8): who may call which tool \
    (principals), where the secrets are (credentials), and what each tool does. The broker reads \
    it at start and again on SIGHUP (systemctl reload), when a valid new policy applies from the \
    next request on and an invalid one is reported and ignored. Run `keyward-broker check \
    --config FILE` to see every error with its line. Unknown keys are errors. Durations are \
    written like \"30s\", \"15m\", \"1h 30m\".";

/// Every section, in the order the page shows them.
pub const SECTIONS: &[Section] = &[
    Section {
        header: "[broker]",
        doc: "Daemon-wide settings. Socket settings and credentials change only on restart.",
        keys: &[
            key("socket", "path", None, "The listening socket when the broker binds it itself (without socket activation); also where `keyward-broker revoke` connects. Required."),
            key("socket_mode", "string", Some("\"0660\""), "Octal file mode of a self-bound socket."),
            key("socket_group", "string", None, "Group (name or number) owning a self-bound socket."),
            key("credentials_dir", "path", None, "Directory of credential files when $CREDENTIALS_DIRECTORY (systemd's LoadCredential=) is unset. Must be accessible to the broker alone."),
            key("state_dir", "path", Some("$STATE_DIRECTORY"), "Token-signing key, revocations and use counts. Without one, tokens are disabled."),
            key("max_token_ttl", "duration", Some("\"15m\""), "Longest lifetime a minted token may have."),
            key("call_timeout", "duration", Some("\"30s\""), "Default upstream timeout of a tool call."),
            key("max_response_bytes", "integer", Some("60000"), "Default cap on a response body (at most 61440)."),
            key("max_connections_per_uid", "integer", Some("32"), "Sessions (connections and channels) one uid may hold open at once."),
            key("admin_uids", "[uid]", Some("[]"), "Uids besides root that may revoke any token."),
            key("signing_key", "string", None, "Name of a [credential.NAME] holding the token-signing key (32 bytes, raw or base64), instead of one generated into the state directory."),
            key("max_sessions", "integer", Some("(descriptor limit - 128) / 2"), "Sessions the broker serves at once, all uids together."),
            key("reserved_sessions", "integer", None, "Of max_sessions, how many only root and admin_uids may take."),
            key("max_sessions_per_token", "integer", None, "Sessions open at once with one token."),
            key("requests_per_second", "integer", None, "Sustained requests per second one uid may make (root and admin_uids are not limited)."),
            key("request_burst", "integer", None, "Requests one uid may make in a burst above that rate."),
            key("max_live_tokens_per_uid", "integer", Some("10000"), "Live tokens one uid may have minted or attenuated at once."),
            key("max_attenuations_per_uid", "integer", Some("1000"), "Live attenuated tokens one uid may have made at once."),
        ],
    },
    Section {
        header: "[[principal]]",
        doc: "Who may do what, matched on the uid and groups the kernel reports for each message. A caller matches a principal if its uid is in uids, or its primary or any supplementary group is in gids.",
        keys: &[
            key("name", "string", None, "The principal's name, in denials and audit records. Required, unique."),
            key("uids", "[uid or user name]", Some("[]"), "Users, by number or name; names are looked up at start and at every reload."),
            key("gids", "[gid or group name]", Some("[]"), "Groups, by number or name (looked up likewise). At least one of uids and gids is required."),
            key("may_call", "[tool]", Some("[]"), "Tools this principal may call directly."),
            key("may_delegate", "[tool]", Some("[]"), "Tools this principal may grant in capability tokens (agent-shim mint)."),
        ],
    },
    Section {
        header: "[credential.NAME]",
        doc: "A secret the broker loads at start, referred to by tools as credential = \"NAME\". Under systemd, give each one a LoadCredential= line (keyward-broker check compares them).",
        keys: &[
            key("kind", "string", None, "Absent for a static secret (sent as the tool's auth says); \"aws\" for an AWS key pair the broker signs with and never sends; \"oauth2\" for a refresh token or client credentials the broker turns into current access tokens."),
            key("file", "string", None, "File name in the credentials directory; under systemd, the LoadCredential= id. Required without kind."),
            key("access_key_id", "string", None, "kind = \"aws\": the access key id (not secret). Required."),
            key("secret_access_key_file", "string", None, "kind = \"aws\": file name of the secret access key in the credentials directory. Required."),
            key("region", "string", Some("\"us-east-1\""), "kind = \"aws\": the region STS calls are signed for."),
            key("endpoint", "string", None, "kind = \"aws\": an STS endpoint override (an emulator, a VPC endpoint)."),
            key("token_url", "string", None, "kind = \"oauth2\": the authorization server's token endpoint. Required."),
            key("client_id", "string", None, "kind = \"oauth2\": the client id. Required."),
            key("client_secret_file", "string", None, "kind = \"oauth2\": file name of the client secret in the credentials directory."),
            key("refresh_token_file", "string", None, "kind = \"oauth2\": file name of the refresh token (grant = \"refresh_token\"); a rotated one is kept in the state directory."),
            key("grant", "string", Some("\"refresh_token\""), "kind = \"oauth2\": refresh_token or client_credentials."),
            key("scopes", "[string]", Some("[]"), "kind = \"oauth2\": scopes asked for at each refresh."),
            key("client_auth", "string", Some("\"basic\""), "kind = \"oauth2\": basic (client_secret_basic) or post (client_secret_post)."),
        ],
    },
    Section {
        header: "[[gateway]]",
        doc: "An HTTP API a sandboxed program reaches through agent-shim run --gateway NAME: the broker checks each request's method, path and size and the token, sends it with the real credential and streams the answer back, judged for credential material. Granted to tokens like a tool of the same name (one use per request).",
        keys: &[
            key("name", "string", None, "Like a tool's name, and no tool may have it. Required."),
            key("description", "string", None, "Shown by agent-shim tools."),
            key("upstream", "string", None, "Base URL of the API (https://api.openai.com); a path here prefixes every request path. Required."),
            key("credential", "string", None, "The [credential.NAME] sent with each request."),
            key("auth", "table", None, "How the credential is sent, as for an http tool: { bearer = true }, { header = \"x-api-key\" }, { basic = \"USER\" }."),
            key("allow", "[{ method, path, query }]", Some("[]"), "The requests allowed: exact method and path; query = true lets that path take a query string."),
            key("max_request_bytes", "integer", None, "Largest request body."),
            key("max_response_bytes", "integer", None, "Largest response body (it streams; this bounds the whole)."),
            key("timeout", "duration", None, "Longest wait for the response head."),
            key("idle_timeout", "duration", None, "Longest wait for the next bytes of a streaming response."),
            key("base_url_env", "[string]", Some("[]"), "Variables the program finds set to the local endpoint (OPENAI_BASE_URL), followed by base_path."),
            key("base_path", "string", Some("\"\""), "Appended to the endpoint's URL in base_url_env (/v1)."),
            key("api_key_env", "[string]", Some("[]"), "Variables the program finds set to a placeholder that is not a secret (OPENAI_API_KEY)."),
        ],
    },
    Section {
        header: "[[tool]]",
        doc: "One action the broker performs. The keys below are common to every kind; the rest belong to the kind (echo, http, exec, sql): see the installed example configuration and the README's table of tool kinds.",
        keys: &[
            key("name", "string", None, "1 to 64 of a-z 0-9 _ . -; unique. Required."),
            key("kind", "string", None, "echo, http, exec or sql. Required."),
            key("description", "string", None, "Shown by agent-shim tools and over MCP."),
            key("credential", "string", None, "The [credential.NAME] the tool uses."),
            key("insecure_http", "boolean", Some("false"), "Allow a plain http:// URL to carry the credential without a warning. For loopback test upstreams only: on a network, the credential would travel in clear text."),
            key("params", "table", None, "The parameters: params.NAME = { ... } (below)."),
        ],
    },
    Section {
        header: "params.NAME",
        doc: "One parameter of a tool. A parameter is always data, placed where the kind puts it, never code.",
        keys: &[
            key("type", "string", None, "string, int, bool or path (a relative path of segments joined by /). Required."),
            key("pattern", "string", None, "A regular expression the whole value must match."),
            key("max_len", "integer", None, "Longest string, in bytes."),
            key("one_of", "array", None, "The value must be one of these."),
            key("min", "integer", None, "Smallest int."),
            key("max", "integer", None, "Largest int."),
            key("prefix", "string", None, "The string must start with this."),
            key("default", "value", None, "Used when the caller omits the parameter; without it the parameter is required."),
            key("secret", "boolean", Some("false"), "Never show the value in denials or audit records."),
        ],
    },
];

/// Files and examples, for the end of the page.
pub const FILES: &[(&str, &str)] = &[
    ("/etc/keyward/broker.toml", "the configuration"),
    (
        "/etc/keyward/credentials/",
        "credential files, root-only, loaded through LoadCredential=",
    ),
    (
        "/var/lib/keyward/",
        "the state directory (StateDirectory=keyward)",
    ),
    (
        "/run/keyward/broker.sock",
        "the socket keyward-broker.socket binds",
    ),
];

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Source;

    /// The keys the parser accepts in a table, from its error for an
    /// unknown key ("unknown field `x`, expected one of `a`, `b`").
    fn accepted(text: &str) -> Vec<String> {
        let err = Source::parse("t.toml", text.to_owned())
            .unwrap_err()
            .to_string();
        let list = err
            .split_once("expected one of ")
            .or_else(|| err.split_once("expected "))
            .unwrap_or_else(|| panic!("no list of keys in: {err}"))
            .1;
        let mut keys: Vec<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    fn documented(header: &str) -> Vec<String> {
        let section = SECTIONS.iter().find(|s| s.header == header).unwrap();
        let mut keys: Vec<String> = section.keys.iter().map(|k| k.name.to_owned()).collect();
        keys.sort();
        keys
    }

    /// `[credential.NAME]` takes its own keys and, by kind, the aws keys
    /// (fields of the entry) or the oauth2 keys (parsed by the kind).
    #[test]
    fn every_credential_key_is_documented_and_no_other() {
        let crate::config::CredentialConfig {
            kind: _,
            file: _,
            access_key_id: _,
            secret_access_key_file: _,
            endpoint: _,
            region: _,
            fields: _,
        } = toml::from_str("").unwrap();
        let mut keys: Vec<String> = [
            "kind",
            "file",
            "access_key_id",
            "secret_access_key_file",
            "endpoint",
            "region",
        ]
        .map(str::to_owned)
        .to_vec();
        let err = toml::from_str::<crate::credential::oauth::OAuth2Config>("zz_unknown = 1")
            .unwrap_err()
            .to_string();
        let list = err.split_once("expected one of ").unwrap().1;
        keys.extend(list.split('`').skip(1).step_by(2).map(str::to_owned));
        keys.sort();
        assert_eq!(
            documented("[credential.NAME]"),
            keys,
            "broker.toml(5) and the parser disagree on the keys of [credential.NAME]: \
             document each key in broker/src/config_doc.rs"
        );
    }

    #[test]
    fn every_key_the_parser_accepts_is_documented_and_no_other() {
        let cases = [
            ("[broker]", "[broker]\nsocket = \"/s\"\nzz_unknown = 1\n"),
            (
                "[[principal]]",
                "[broker]\nsocket = \"/s\"\n[[principal]]\nzz_unknown = 1\n",
            ),
            (
                "[[gateway]]",
                "[broker]\nsocket = \"/s\"\n[[gateway]]\nzz_unknown = 1\n",
            ),
            (
                "params.NAME",
                "[broker]\nsocket = \"/s\"\n[[tool]]\nname = \"t\"\nkind = \"echo\"\n\
                 params.p = { type = \"string\", zz_unknown = 1 }\n",
            ),
        ];
        for (header, text) in cases {
            assert_eq!(
                documented(header),
                accepted(text),
                "broker.toml(5) and the parser disagree on the keys of {header}: \
                 document each key in broker/src/config_doc.rs"
            );
        }
    }

    #[test]
    fn the_common_tool_keys_are_the_parsers() {
        // [[tool]] takes every other key for its kind, so the parser cannot
        // list them: each documented one must parse into its own field.
        let text = "[broker]\nsocket = \"/s\"\n[[tool]]\nname = \"t\"\nkind = \"echo\"\n\
                    description = \"d\"\ncredential = \"c\"\ninsecure_http = true\n\
                    params.p = { type = \"string\" }\n";
        let src = Source::parse("t.toml", text.to_owned()).unwrap();
        let tool = src.config.tools[0].get_ref();
        assert!(tool.fields.is_empty(), "{:?}", tool.fields);
        assert_eq!(
            documented("[[tool]]"),
            [
                "credential",
                "description",
                "insecure_http",
                "kind",
                "name",
                "params"
            ]
        );
    }
}
