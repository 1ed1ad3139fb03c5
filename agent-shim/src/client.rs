// SPDX-License-Identifier: Apache-2.0
//! The broker client ([`keyward_client`]), and the one piece of it that
//! needs the shim's raw descriptor handling: joining the bound session
//! that `agent-shim run` passes as `$KEYWARD_FD`.

use std::os::fd::RawFd;

pub use keyward_client::*;

/// Inside `agent-shim run` (`$KEYWARD_FD` set): a channel of its own over
/// the inherited broker connection. Elsewhere: a new connection to
/// [`socket_path`].
pub fn from_env_or_socket() -> Result<Client, ClientError> {
    match std::env::var_os(KEYWARD_FD_ENV) {
        Some(value) => {
            let bad = |message: String| ClientError::InheritedFd {
                value: value.to_string_lossy().into_owned(),
                message,
            };
            let fd: RawFd = value
                .to_str()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("not a descriptor number".to_owned()))?;
            let shared = crate::sys::dup_inherited(fd)
                .map_err(|e| bad(format!("not an open descriptor: {e}")))?;
            Client::open_channel(&shared)
        }
        None => Client::connect(&socket_path()),
    }
}
