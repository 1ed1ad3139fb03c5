// SPDX-License-Identifier: Apache-2.0
//! The broker's token-signing key.
//!
//! Generated on first start into the state directory (`signing.key`, 32
//! raw bytes, mode 0600, owned by the broker) or loaded from a credential
//! named by `signing_key` in `[broker]`. The public half verifies tokens and
//! is what `keyward-broker pubkey` prints.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::access;
use crate::credential::Secret;
use crate::state::sync_dir;

/// File name of the generated key in the state directory.
pub const KEY_FILE: &str = "signing.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("signing key {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signing key {path} {who}; chmod 0600 it")]
    Mode { path: PathBuf, who: String },
    #[error("signing key {0}: expected 32 raw bytes or their base64")]
    Format(String),
    #[error("no signing key in {0} yet: start the broker once to generate it")]
    Missing(PathBuf),
    #[error("cannot get random bytes: {0}")]
    Random(String),
}

/// The signing key and its public half. The private key's bytes live in
/// a [`Secret`] — locked pages, excluded from core dumps, zeroized on
/// drop — and a `SigningKey` is built from them only for the moment of a
/// signature (it zeroizes itself on drop). Never printed.
pub struct Keys {
    secret: Secret,
    verifying: VerifyingKey,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys {{ public: {} }}", self.public_text())
    }
}

impl Keys {
    /// Load `signing.key` from the state directory, creating it first if
    /// it does not exist. Creation is atomic: the key is written to a
    /// temporary file, synced, then linked into place, so a crash leaves
    /// either no key or a whole one.
    pub fn load_or_create(state_dir: &Path) -> Result<Keys, KeyError> {
        let path = state_dir.join(KEY_FILE);
        match Keys::load_file(&path) {
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Keys::create(&path)?;
                Keys::load_file(&path)
            }
            other => other,
        }
    }

    /// Load an existing `signing.key`; never creates one.
    pub fn load_existing(state_dir: &Path) -> Result<Keys, KeyError> {
        let path = state_dir.join(KEY_FILE);
        match Keys::load_file(&path) {
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(KeyError::Missing(state_dir.to_owned()))
            }
            other => other,
        }
    }

    /// Use a credential as the key: 32 raw bytes or their base64.
    pub fn from_credential(name: &str, secret: &Secret) -> Result<Keys, KeyError> {
        let bytes = secret.expose();
        let raw: Zeroizing<Vec<u8>> = if bytes.len() == 32 {
            Zeroizing::new(bytes.to_vec())
        } else {
            let text = std::str::from_utf8(bytes).map_err(|_| KeyError::Format(name.into()))?;
            Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .or_else(|_| {
                        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim())
                    })
                    .map_err(|_| KeyError::Format(name.into()))?,
            )
        };
        Keys::from_raw(&raw).ok_or_else(|| KeyError::Format(name.into()))
    }

    fn from_raw(raw: &[u8]) -> Option<Keys> {
        let bytes: &[u8; 32] = raw.try_into().ok()?;
        let verifying = SigningKey::from_bytes(bytes).verifying_key();
        Some(Keys {
            secret: Secret::new(Zeroizing::new(bytes.to_vec())),
            verifying,
        })
    }

    fn load_file(path: &Path) -> Result<Keys, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let all = access::READ | access::WRITE | access::EXECUTE;
        if let Some(who) = access::others_with_access(&file, &meta, all) {
            return Err(KeyError::Mode {
                path: path.to_owned(),
                who,
            });
        }
        let mut raw = Zeroizing::new(Vec::with_capacity(32));
        std::io::Read::read_to_end(&mut std::io::Read::take(&file, 33), &mut raw).map_err(io)?;
        Keys::from_raw(&raw).ok_or_else(|| KeyError::Format(path.display().to_string()))
    }

    fn create(path: &Path) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(raw.as_mut_slice()).map_err(|e| KeyError::Random(e.to_string()))?;
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let mut file = crate::state::fresh_private(&tmp).map_err(io)?;
        file.write_all(raw.as_slice()).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        // link fails if another broker won the race: use theirs.
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => sync_dir(path).map_err(io),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// Sign with the private key (held only for this call).
    pub fn sign_token(&self, body: &keyward_proto::token::TokenBody) -> String {
        let bytes: [u8; 32] = self
            .secret
            .expose()
            .try_into()
            .expect("a signing key is 32 bytes: from_raw admits nothing else");
        let key = SigningKey::from_bytes(&bytes);
        let mut bytes = bytes;
        zeroize::Zeroize::zeroize(&mut bytes);
        keyward_proto::token::issue(body, &key)
    }

    pub fn verifying(&self) -> VerifyingKey {
        self.verifying
    }

    /// `ed25519:` + base64url of the public key.
    pub fn public_text(&self) -> String {
        format!(
            "ed25519:{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.verifying().as_bytes())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn generated_once_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Keys::load_existing(dir.path()),
            Err(KeyError::Missing(_))
        ));
        let a = Keys::load_or_create(dir.path()).unwrap();
        let b = Keys::load_or_create(dir.path()).unwrap();
        assert_eq!(a.verifying(), b.verifying());
        let meta = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.secret.expose())));
    }

    #[test]
    fn refuses_a_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        Keys::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Keys::load_existing(dir.path()),
            Err(KeyError::Mode { .. })
        ));
    }
}
