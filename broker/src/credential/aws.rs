// SPDX-License-Identifier: Apache-2.0
//! `[credential.NAME] kind = "aws"`: an AWS access key.
//!
//! The access key id is configuration (it names the key, it proves
//! nothing); the secret access key is the credential's secret, loaded from
//! `secret_access_key_file` like every other secret (locked pages,
//! redacted, judged for leaks). Two uses, both here so that the key is
//! touched in one place:
//!
//! - [`sign`]: an `http` tool with `auth = { aws_sigv4 = { service,
//!   region } }` has its request signed with SigV4 by the maintained
//!   `aws-sigv4` crate (never a hand-rolled signer); for S3 the payload's
//!   SHA-256 goes in `x-amz-content-sha256`. The caller never holds a key.
//! - [`sts`]: the `aws_sts` tool kind asks STS (AssumeRole or
//!   GetFederationToken, a SigV4-signed form POST) for short-lived
//!   credentials scoped by a session policy; the reply's XML is parsed
//!   with `quick-xml`.
//!
//! `endpoint` overrides the STS endpoint (a VPC endpoint, an emulator);
//! `region` is the STS region and the region derived credentials are for
//! (default `us-east-1`).

use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign as sigv4_sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
    SigningSettings, UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::Secret;
use crate::config::CredentialConfig;

/// The `kind` of an AWS credential.
pub const KIND: &str = crate::config::AWS_KIND;

/// Region when the credential names none.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The public half of an AWS credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKey {
    pub access_key_id: String,
    pub region: String,
    /// STS endpoint override, without a trailing `/`.
    pub endpoint: Option<String>,
}

impl AwsKey {
    /// The key of an `[credential.NAME]` entry of kind `"aws"`, once
    /// [`check`] found it sound.
    pub fn from_config(config: &CredentialConfig) -> Option<AwsKey> {
        if config.kind.as_deref() != Some(KIND) {
            return None;
        }
        Some(AwsKey {
            access_key_id: config.access_key_id.clone()?,
            region: config
                .region
                .clone()
                .unwrap_or_else(|| DEFAULT_REGION.to_owned()),
            endpoint: config
                .endpoint
                .as_deref()
                .map(|e| e.trim_end_matches('/').to_owned()),
        })
    }

    /// Where STS requests go.
    pub fn sts_url(&self) -> String {
        match &self.endpoint {
            Some(endpoint) => format!("{endpoint}/"),
            None => format!("https://sts.{}.amazonaws.com/", self.region),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("the secret access key is not text, so it cannot sign")]
    NotText,
    #[error("header {0} is not text, so it cannot be signed")]
    Header(String),
    #[error("cannot sign the request: {0}")]
    Sign(String),
    #[error("STS request failed: {0}")]
    Request(String),
    #[error("STS reply is not understood: {0}")]
    Reply(String),
}

/// Check the fields of a `kind = "aws"` credential. Messages start with
/// the field they are about.
pub fn check(config: &CredentialConfig) -> Vec<String> {
    let mut errors = Vec::new();
    if config.file.is_some() {
        errors.push(
            "file: not allowed for kind \"aws\" (the secret access key is in secret_access_key_file)"
                .to_owned(),
        );
    }
    match config.access_key_id.as_deref() {
        None => errors.push("access_key_id: is required for kind \"aws\"".to_owned()),
        Some(id)
            if !(16..=128).contains(&id.len())
                || !id.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            errors.push(format!(
                "access_key_id: {id:?} is not an AWS access key id (16 to 128 letters and digits)"
            ));
        }
        Some(_) => {}
    }
    if config.secret_access_key_file.is_none() {
        errors.push("secret_access_key_file: is required for kind \"aws\"".to_owned());
    }
    if let Some(region) = config.region.as_deref() {
        if !valid_region(region) {
            errors.push(format!(
                "region: {region:?} is not an AWS region name (like \"us-east-1\")"
            ));
        }
    }
    if let Some(endpoint) = config.endpoint.as_deref() {
        match reqwest::Url::parse(endpoint) {
            Ok(url)
                if matches!(url.scheme(), "http" | "https")
                    && url.host().is_some()
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.query().is_none()
                    && url.fragment().is_none() => {}
            _ => errors.push(format!(
                "endpoint: {endpoint:?} is not an http(s) URL without user, query or fragment"
            )),
        }
    }
    errors
}

/// `[a-z0-9-]{1,32}`, starting and ending with a letter or digit.
pub fn valid_region(region: &str) -> bool {
    (1..=32).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !region.starts_with('-')
        && !region.ends_with('-')
}

/// A SigV4 service name: `[a-z0-9-]{1,64}`.
pub fn valid_service(service: &str) -> bool {
    (1..=64).contains(&service.len())
        && service
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Sign `request` (whose body is `body`) for `service` in `region` with
/// the key, adding `Authorization`, `x-amz-date` and, for S3,
/// `x-amz-content-sha256`. Call after every other header is set: later
/// changes would break the signature.
pub fn sign(
    request: &mut reqwest::Request,
    body: &[u8],
    key: &AwsKey,
    secret: &Secret,
    service: &str,
    region: &str,
) -> Result<(), AwsError> {
    let secret = Zeroizing::new(
        std::str::from_utf8(secret.expose())
            .map_err(|_| AwsError::NotText)?
            .to_owned(),
    );
    // `Credentials` keeps the secret in a zeroizing buffer of its own.
    let identity = aws_credential_types::Credentials::new(
        key.access_key_id.clone(),
        secret.as_str(),
        None,
        None,
        "keyward",
    )
    .into();
    let mut settings = SigningSettings::default();
    if service == "s3" {
        // S3 signs the path as sent, once encoded, and wants the payload
        // hash in a header.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .map_err(|e| AwsError::Sign(e.to_string()))?
        .into();
    let mut headers = Vec::with_capacity(request.headers().len());
    for (name, value) in request.headers() {
        let value = value
            .to_str()
            .map_err(|_| AwsError::Header(name.as_str().to_owned()))?;
        headers.push((name.as_str(), value));
    }
    let signable = SignableRequest::new(
        request.method().as_str(),
        request.url().as_str(),
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| AwsError::Sign(e.to_string()))?;
    let (instructions, _signature) = sigv4_sign(signable, &params)
        .map_err(|e| AwsError::Sign(e.to_string()))?
        .into_parts();
    let (signed_headers, _params) = instructions.into_parts();
    for header in signed_headers {
        let name = HeaderName::from_static(header.name());
        let mut value =
            HeaderValue::from_str(header.value()).map_err(|e| AwsError::Sign(e.to_string()))?;
        value.set_sensitive(header.sensitive());
        request.headers_mut().insert(name, value);
    }
    Ok(())
}

/// What to ask STS for.
#[derive(Debug, Clone)]
pub enum StsAction<'a> {
    /// `AssumeRole`: credentials of the role, narrowed by the policy.
    AssumeRole {
        role_arn: &'a str,
        /// `RoleSessionName`: shows in the assumed-role ARN, so in every
        /// CloudTrail event made with the credentials.
        session_name: &'a str,
        /// `SourceIdentity`: CloudTrail records it, and it survives role
        /// chaining (the role's trust policy must allow
        /// `sts:SetSourceIdentity`).
        source_identity: &'a str,
    },
    /// `GetFederationToken`: credentials of the key's own user, narrowed
    /// by the (then required) policy.
    GetFederationToken {
        /// `Name` (2 to 32 characters): shows in the federated user's ARN.
        name: &'a str,
    },
}

/// One STS request.
#[derive(Debug, Clone)]
pub struct StsRequest<'a> {
    pub action: StsAction<'a>,
    /// The session policy, JSON.
    pub policy: Option<&'a str>,
    pub duration_seconds: u64,
}

/// Credentials STS derived. The secret parts are zeroized on drop and
/// hidden from `Debug`; they are meant for the caller.
pub struct Derived {
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub session_token: Zeroizing<String>,
    /// As STS wrote it (ISO 8601, UTC).
    pub expiration: String,
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Derived")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// Form values: everything but unreserved characters percent-encoded.
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

impl StsRequest<'_> {
    /// The `application/x-www-form-urlencoded` body of the request.
    pub fn form(&self) -> String {
        let duration = self.duration_seconds.to_string();
        let mut fields: Vec<(&str, &str)> = vec![("Version", "2011-06-15")];
        match &self.action {
            StsAction::AssumeRole {
                role_arn,
                session_name,
                source_identity,
            } => {
                fields.push(("Action", "AssumeRole"));
                fields.push(("RoleArn", role_arn));
                fields.push(("RoleSessionName", session_name));
                fields.push(("SourceIdentity", source_identity));
            }
            StsAction::GetFederationToken { name } => {
                fields.push(("Action", "GetFederationToken"));
                fields.push(("Name", name));
            }
        }
        fields.push(("DurationSeconds", &duration));
        if let Some(policy) = self.policy {
            fields.push(("Policy", policy));
        }
        fields
            .iter()
            .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, FORM)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// The signed HTTP request asking STS for derived credentials (sent by
/// the `aws_sts` tool kind).
pub fn sts_request(
    key: &AwsKey,
    secret: &Secret,
    request: &StsRequest<'_>,
) -> Result<reqwest::Request, AwsError> {
    let url = reqwest::Url::parse(&key.sts_url()).map_err(|e| AwsError::Request(e.to_string()))?;
    let body = request.form();
    let mut http = reqwest::Request::new(reqwest::Method::POST, url);
    http.headers_mut().insert(
        reqwest::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
    );
    http.headers_mut().insert(
        reqwest::header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    sign(&mut http, body.as_bytes(), key, secret, "sts", &key.region)?;
    *http.body_mut() = Some(body.into_bytes().into());
    Ok(http)
}

/// The `(Code, Message)` of an STS error reply.
pub fn parse_error(text: &str) -> Option<(String, String)> {
    let e: ErrorEnvelope = quick_xml::de::from_str(text).ok()?;
    Some((e.error.code, e.error.message.unwrap_or_default()))
}

/// The `Credentials` of an `AssumeRole` or `GetFederationToken` reply.
pub fn parse_reply(text: &str) -> Result<Derived, AwsError> {
    let envelope: Envelope =
        quick_xml::de::from_str(text).map_err(|e| AwsError::Reply(e.to_string()))?;
    let c = envelope.result.credentials;
    Ok(Derived {
        access_key_id: c.access_key_id,
        secret_access_key: Zeroizing::new(c.secret_access_key),
        session_token: Zeroizing::new(c.session_token),
        expiration: c.expiration,
    })
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "AssumeRoleResult", alias = "GetFederationTokenResult")]
    result: ResultXml,
}

#[derive(Deserialize)]
struct ResultXml {
    #[serde(rename = "Credentials")]
    credentials: CredentialsXml,
}

#[derive(Deserialize)]
struct CredentialsXml {
    #[serde(rename = "AccessKeyId")]
    access_key_id: String,
    #[serde(rename = "SecretAccessKey")]
    secret_access_key: String,
    #[serde(rename = "SessionToken")]
    session_token: String,
    #[serde(rename = "Expiration")]
    expiration: String,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    #[serde(rename = "Error")]
    error: ErrorXml,
}

#[derive(Deserialize)]
struct ErrorXml {
    #[serde(rename = "Code")]
    code: String,
    #[serde(rename = "Message")]
    message: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn key() -> AwsKey {
        AwsKey {
            access_key_id: "AKIDEXAMPLE12345".to_owned(),
            region: "us-east-1".to_owned(),
            endpoint: None,
        }
    }

    fn secret() -> Secret {
        Secret::new(Zeroizing::new(SECRET_KEY.as_bytes().to_vec()))
    }

    #[test]
    fn signs_s3_with_the_payload_hash_and_never_the_secret() {
        let url = reqwest::Url::parse("http://127.0.0.1:9000/bucket/analysis/a.txt").unwrap();
        let mut request = reqwest::Request::new(reqwest::Method::GET, url);
        sign(&mut request, b"", &key(), &secret(), "s3", "us-east-1").unwrap();
        let auth = request.headers()["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE12345/"),
            "{auth}"
        );
        assert!(auth.contains("/us-east-1/s3/aws4_request"), "{auth}");
        assert!(auth.contains("x-amz-content-sha256"), "{auth}");
        assert_eq!(
            request.headers()["x-amz-content-sha256"],
            // SHA-256 of the empty payload.
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        for (_, value) in request.headers() {
            assert!(!value
                .as_bytes()
                .windows(8)
                .any(|w| SECRET_KEY.as_bytes().windows(8).any(|s| s == w)));
        }
        assert!(!format!("{request:?}").contains(SECRET_KEY));
    }

    #[test]
    fn form_encodes_the_policy_as_one_value() {
        let policy = r#"{"a":"b&Action=GetFederationToken"}"#;
        let form = StsRequest {
            action: StsAction::AssumeRole {
                role_arn: "arn:aws:iam::123456789012:role/r",
                session_name: "kw-0123",
                source_identity: "kw-0123",
            },
            policy: Some(policy),
            duration_seconds: 900,
        }
        .form();
        assert!(form.contains("Action=AssumeRole&"), "{form}");
        assert_eq!(form.matches("Action=").count(), 1, "{form}");
        assert!(form.contains("DurationSeconds=900"), "{form}");
        assert!(form.contains("RoleSessionName=kw-0123"), "{form}");
        let encoded = form
            .split('&')
            .find_map(|kv| kv.strip_prefix("Policy="))
            .unwrap();
        assert_eq!(
            percent_encoding::percent_decode_str(encoded)
                .decode_utf8()
                .unwrap(),
            policy
        );
    }

    #[test]
    fn parses_both_replies_and_errors() {
        let assume = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult><SourceIdentity>kw</SourceIdentity>
    <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/r/kw</Arn><AssumedRoleId>ARO:kw</AssumedRoleId></AssumedRoleUser>
    <Credentials><AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>s3cr3t&amp;x</SecretAccessKey>
      <SessionToken>tok</SessionToken><Expiration>2026-11-30T03:00:00Z</Expiration></Credentials>
  </AssumeRoleResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></AssumeRoleResponse>"#;
        let d = parse_reply(assume).unwrap();
        assert_eq!(d.access_key_id, "ASIAEXAMPLE");
        assert_eq!(d.secret_access_key.as_str(), "s3cr3t&x");
        assert_eq!(d.expiration, "2026-11-30T03:00:00Z");
        assert!(!format!("{d:?}").contains("s3cr3t"));
        let federation = assume
            .replace("AssumeRoleResult", "GetFederationTokenResult")
            .replace("AssumeRoleResponse", "GetFederationTokenResponse");
        assert_eq!(
            parse_reply(&federation).unwrap().session_token.as_str(),
            "tok"
        );
        assert!(parse_reply("<x/>").is_err());
        let error = r#"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>no</Message></Error></ErrorResponse>"#;
        assert_eq!(
            parse_error(error).unwrap(),
            ("AccessDenied".to_owned(), "no".to_owned())
        );
    }

    #[test]
    fn checks_the_config() {
        let mut config = CredentialConfig {
            file: None,
            kind: Some(KIND.to_owned()),
            access_key_id: Some("AKIAIOSFODNN7EXAMPLE".to_owned()),
            secret_access_key_file: Some("aws.secret".into()),
            endpoint: Some("http://127.0.0.1:5000".to_owned()),
            region: Some("eu-west-1".to_owned()),
            fields: toml::Table::new(),
        };
        assert!(check(&config).is_empty(), "{:?}", check(&config));
        assert_eq!(
            AwsKey::from_config(&config).unwrap().sts_url(),
            "http://127.0.0.1:5000/"
        );
        config.region = Some("EU WEST".to_owned());
        config.endpoint = Some("ftp://x".to_owned());
        config.access_key_id = Some("AK/IA".to_owned());
        config.file = Some("x".into());
        let errors = check(&config).join("\n");
        for field in ["region:", "endpoint:", "access_key_id:", "file:"] {
            assert!(errors.contains(field), "{errors}");
        }
    }
}
