// SPDX-License-Identifier: Apache-2.0
//! The listening socket.

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("socket {path}: {source}")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
