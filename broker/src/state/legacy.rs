// SPDX-License-Identifier: Apache-2.0
//! Import of the first format, `tokens.json` (one JSON document rewritten
//! whole on every change), into the log, once: the log is written and
//! made durable first, then the old file is removed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use keyward_proto::token::TokenId;

use super::log::Record;
use super::{MintRecord, StateError, UNKNOWN_OWNER};

/// File name of the old format.
pub const LEGACY_FILE: &str = "tokens.json";

#[derive(Deserialize)]
struct Persisted {
    version: u32,
    revoked: BTreeMap<String, u64>,
    uses: BTreeMap<String, u32>,
    minted: BTreeMap<String, OldMint>,
    #[serde(default)]
    high_water: u64,
}

#[derive(Deserialize)]
struct OldMint {
    issuer: String,
    expires: u64,
    max_uses: Option<u32>,
}

/// The records of `tokens.json` in `dir`, or `None` if there is none.
pub fn read(dir: &Path) -> Result<Option<Vec<Record>>, StateError> {
    let path = dir.join(LEGACY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    let corrupt = |message: String| StateError::Corrupt {
        path: path.clone(),
        message: format!("{message}; it was not imported"),
    };
    let old: Persisted = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if old.version != 1 {
        return Err(corrupt(format!("unknown format version {}", old.version)));
    }
    let id = |hex: &str| -> Result<TokenId, StateError> {
        hex.parse()
            .map_err(|_| corrupt(format!("{hex:?} is not a token id")))
    };
    let mut records = vec![Record::Clock(old.high_water)];
    for (hex, m) in &old.minted {
        let record = MintRecord {
            issuer: m.issuer.clone(),
            expires: m.expires,
            max_uses: m.max_uses,
            owner: UNKNOWN_OWNER,
            attenuated: false,
            origin: None,
        };
        records.push(Record::Mint(id(hex)?, record));
    }
    let uses = old
        .uses
        .iter()
        .map(|(hex, n)| Ok((id(hex)?, *n)))
        .collect::<Result<Vec<_>, StateError>>()?;
    records.push(Record::Uses(uses));
    for (hex, expires) in &old.revoked {
        records.push(Record::Revoke(id(hex)?, *expires));
    }
    Ok(Some(records))
}

/// Remove `tokens.json` once its records are durable in the log.
pub fn remove(dir: &Path) -> Result<(), StateError> {
    let path = dir.join(LEGACY_FILE);
    std::fs::remove_file(&path)
        .and_then(|()| super::sync_dir(&path))
        .map_err(|source| StateError::Io { path, source })
}
