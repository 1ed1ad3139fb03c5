// SPDX-License-Identifier: Apache-2.0
//! Unit tests of `kind = "oauth2"`: configuration checks, the token
//! endpoint's answers, the state file, and that no value shows. The
//! refresh itself runs against a real authorization server in
//! `tests/tests/oauth.rs`.

use std::os::unix::fs::PermissionsExt;

use super::*;

const CLIENT_SECRET: &str = "cs-Vq8Lm2Rt6Yw0Pz4Nk7Bx";
const REFRESH: &str = "rt-Ha5Gj9Ds3Fu1Qe8Mc6Wo";
const ROTATED: &str = "rt-Zl4Xi7Ck2Vb5Nt0Sy3Ap";

fn entry(text: &str) -> CredentialConfig {
    toml::from_str(text).unwrap()
}

const GOOD: &str = "kind = \"oauth2\"\ntoken_url = \"https://auth.example/token\"\n\
                    client_id = \"id\"\nclient_secret_file = \"c\"\nrefresh_token_file = \"r\"\n\
                    scopes = [\"a\", \"b\"]";

fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn write(dir: &Path, file: &str, content: &str) {
    let path = dir.join(file);
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A credential loaded from `GOOD` with files in a private directory;
/// the state directory is `state/` inside it.
fn loaded(dir: &Path) -> Result<OAuth2Credential, CredentialError> {
    OAuth2Credential::load(
        "gmail",
        &entry(GOOD),
        dir,
        Some(&dir.join("state")),
        Arc::new(Coverage::default()),
    )
}

fn setup() -> tempfile::TempDir {
    let dir = private_dir();
    write(dir.path(), "c", &format!("{CLIENT_SECRET}\n"));
    write(dir.path(), "r", &format!("{REFRESH}\n"));
    dir
}

#[test]
fn a_good_entry_passes_and_bad_ones_say_which_field() {
    assert!(check_config("gmail", &entry(GOOD)).is_empty());
    let cases = [
        ("kind = \"oauth2\"\nclient_id = \"i\"\nrefresh_token_file = \"r\"", "token_url: is required"),
        ("kind = \"oauth2\"\ntoken_url = \"ftp://x/\"\nclient_id = \"i\"\nrefresh_token_file = \"r\"", "token_url: \"ftp://x/\" is not an http(s) URL"),
        ("kind = \"oauth2\"\ntoken_url = \"https://x/\"\nrefresh_token_file = \"r\"", "client_id: is required"),
        ("kind = \"oauth2\"\ntoken_url = \"https://x/\"\nclient_id = \"i\"", "refresh_token_file: is required for grant = \"refresh_token\""),
        ("kind = \"oauth2\"\ntoken_url = \"https://x/\"\nclient_id = \"i\"\ngrant = \"client_credentials\"", "client_secret_file: is required for grant = \"client_credentials\""),
        ("kind = \"oauth2\"\ntoken_url = \"https://x/\"\nclient_id = \"i\"\nrefresh_token_file = \"../r\"", "refresh_token_file: \"../r\" must be a plain file name"),
        ("kind = \"oauth2\"\ntoken_url = \"https://x/\"\nclient_id = \"i\"\nrefresh_token_file = \"r\"\nfile = \"f\"", "file: not used by kind \"oauth2\""),
        ("kind = \"oauth2\"\ntoken_url = \"https://x/\"\nclient_id = \"i\"\nrefresh_token_file = \"r\"\nscope = \"a\"", "scope: not allowed for kind \"oauth2\""),
        ("kind = \"oauth2\"\ntoken_url = \"https://x/\"\nclient_id = \"i\"\nrefresh_token_file = \"r\"\nscopes = [\"a b\"]", "scopes: \"a b\" is not a scope"),
        ("kind = \"oauth2\"\ntoken_url = \"https://x/\"\nclient_id = \"i\"\nrefresh_token_file = \"r\"\ngrant = \"password\"", "unknown variant `password`"),
    ];
    for (text, expected) in cases {
        let errors = check_config("gmail", &entry(text));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(expected) || e.contains(expected)),
            "{text}: {errors:?}"
        );
    }
    let errors = check_config("a/b", &entry(GOOD));
    assert!(errors[0].contains("letters, digits"), "{errors:?}");
}

#[test]
fn debug_and_errors_never_show_a_value() {
    let dir = setup();
    let credential = loaded(dir.path()).unwrap();
    let debug = format!("{credential:?}");
    for value in [CLIENT_SECRET, REFRESH] {
        assert!(!debug.contains(value), "{debug}");
    }
    assert!(debug.contains("gmail"), "{debug}");
    assert_eq!(credential.state(), CredentialState::Loaded);
    // Both values are covered from the start.
    let scanner = credential.coverage.scanner();
    assert!(scanner.check(REFRESH.as_bytes()).is_err());
    assert!(scanner.check(CLIENT_SECRET.as_bytes()).is_err());
    assert_eq!(
        credential.coverage.redactor().redact_str(REFRESH),
        crate::redact::REDACTED
    );
}

#[test]
fn token_endpoint_answers() {
    let dir = setup();
    let credential = loaded(dir.path()).unwrap();
    let tokens = |body: &str| credential.answer(200, body.as_bytes());
    match tokens(r#"{"access_token":"at-0123456789","token_type":"bearer","expires_in":"3600"}"#)
        .unwrap()
    {
        Answer::Tokens {
            access,
            refresh,
            expires_in,
        } => {
            assert_eq!(access.as_str(), "at-0123456789");
            assert!(refresh.is_none());
            assert_eq!(expires_in, Some(3600));
        }
        Answer::Rejected(r) => panic!("{r}"),
    }
    assert!(matches!(
        tokens(r#"{"access_token":"at-0123456789","token_type":"mac"}"#),
        Err(OAuthError::BadResponse { .. })
    ));
    assert!(matches!(
        tokens("<html>"),
        Err(OAuthError::BadResponse { .. })
    ));
    match credential.answer(400, br#"{"error":"invalid_grant","error_description":"x"}"#) {
        Ok(Answer::Rejected(reason)) => assert_eq!(
            reason,
            "the authorization server rejected the refresh token (invalid_grant); re-authorize and reload"
        ),
        _ => panic!("invalid_grant is not a rejection"),
    }
    assert!(matches!(
        credential.answer(401, br#"{"error":"invalid_client"}"#),
        Ok(Answer::Rejected(_))
    ));
    let err = match credential.answer(400, br#"{"error":"invalid_scope"}"#) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("invalid_scope accepted"),
    };
    assert_eq!(
        err,
        "credential gmail: the token endpoint refused the request (HTTP 400, invalid_scope)"
    );
    // An error code that is not one is not quoted.
    let err = match credential.answer(400, br#"{"error":"<script>"}"#) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        err,
        "credential gmail: the token endpoint answered HTTP 400"
    );
}

#[test]
fn the_state_file_is_private_atomic_and_preferred_while_it_descends_from_the_configured_token() {
    let dir = setup();
    let credential = loaded(dir.path()).unwrap();
    credential.persist(&secret_of(ROTATED)).unwrap();
    let path = dir.path().join("state/oauth2-gmail.json");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let dir_meta = std::fs::metadata(dir.path().join("state")).unwrap();
    assert_eq!(dir_meta.permissions().mode() & 0o777, 0o700);
    assert!(!path.with_extension("json.tmp").exists());
    // Loaded again: the rotated token wins over the configured one.
    let again = loaded(dir.path()).unwrap();
    let current = again.lock().refresh_token.clone().unwrap();
    assert_eq!(current.expose(), ROTATED.as_bytes());
    // Both are covered.
    assert!(again.coverage.scanner().check(ROTATED.as_bytes()).is_err());
    assert!(again.coverage.scanner().check(REFRESH.as_bytes()).is_err());
    // The admin re-authorized: a new configured token wins.
    write(dir.path(), "r", "rt-Kp3Gw8Yh1Ej6Dq9Tm4Zc\n");
    let fresh = loaded(dir.path()).unwrap();
    let current = fresh.lock().refresh_token.clone().unwrap();
    assert_eq!(current.expose(), b"rt-Kp3Gw8Yh1Ej6Dq9Tm4Zc");
    // A state file others can read is refused, naming it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = loaded(dir.path()).unwrap_err().to_string();
    assert!(err.contains("oauth2-gmail.json"), "{err}");
    assert!(!err.contains(ROTATED), "{err}");
}

#[test]
fn a_refresh_grant_needs_a_state_directory() {
    let dir = setup();
    let err = OAuth2Credential::load(
        "gmail",
        &entry(GOOD),
        dir.path(),
        None,
        Arc::new(Coverage::default()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("set broker.state_dir"), "{err}");
}

#[test]
fn reauthorize_repairs_a_broken_credential_only_with_a_new_token() {
    let dir = setup();
    let credential = loaded(dir.path()).unwrap();
    assert!(credential.reauthorize().is_none(), "not broken");
    credential.lock().broken = Some("rejected".to_owned());
    let line = credential.reauthorize().unwrap();
    assert!(line.contains("stays broken"), "{line}");
    assert!(matches!(credential.state(), CredentialState::Broken(_)));
    write(dir.path(), "r", "rt-Kp3Gw8Yh1Ej6Dq9Tm4Zc\n");
    let line = credential.reauthorize().unwrap();
    assert!(line.contains("re-authorized"), "{line}");
    assert_eq!(credential.state(), CredentialState::Loaded);
    let current = credential.lock().refresh_token.clone().unwrap();
    assert_eq!(current.expose(), b"rt-Kp3Gw8Yh1Ej6Dq9Tm4Zc");
    assert!(credential
        .coverage
        .scanner()
        .check(b"rt-Kp3Gw8Yh1Ej6Dq9Tm4Zc")
        .is_err());
}

#[test]
fn a_replaced_access_token_stays_covered() {
    let dir = setup();
    let credential = loaded(dir.path()).unwrap();
    let first = "at-Ue6Ro1Tg8Kf3Jh5Wd9Lq";
    let second = "at-Mb2Nv7Ec4Xs0Oz6Iy1Pr";
    let token = credential
        .install(Zeroizing::new(first.to_owned()), None, Some(3600))
        .unwrap();
    assert_eq!(token.secret.expose(), first.as_bytes());
    assert!(credential
        .coverage
        .scanner()
        .check(first.as_bytes())
        .is_err());
    let token = credential
        .install(Zeroizing::new(second.to_owned()), None, Some(3600))
        .unwrap();
    assert_eq!(token.generation, 2);
    // Calls in flight may still hold the first one, and it stays valid
    // upstream until it expires.
    for value in [first, second, REFRESH, CLIENT_SECRET] {
        assert!(
            credential
                .coverage
                .scanner()
                .check(value.as_bytes())
                .is_err(),
            "{value} not covered"
        );
        assert_eq!(
            credential.coverage.redactor().redact_str(value),
            crate::redact::REDACTED
        );
    }
    // No refresh token in the answer: the configured one stays.
    let kept = credential.lock().refresh_token.clone().unwrap();
    assert_eq!(kept.expose(), REFRESH.as_bytes());
    // Too short to redact reliably: refused, not used.
    assert!(credential
        .install(Zeroizing::new("short".to_owned()), None, None)
        .is_err());
}
