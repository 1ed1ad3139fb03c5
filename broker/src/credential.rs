// SPDX-License-Identifier: Apache-2.0
//! Credentials: loaded once at start, held only in zeroize-on-drop buffers.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// A secret value. Zeroized on drop; `Debug` prints `[redacted]`.
pub struct Secret(zeroize::Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Every configured credential, by name, plus the redactor for all of them.
#[derive(Debug, Default)]
pub struct Credentials {
    secrets: BTreeMap<String, Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("credential directory {path}: {message}")]
    Directory { path: PathBuf, message: String },
}
