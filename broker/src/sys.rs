// SPDX-License-Identifier: Apache-2.0
//! Raw system calls, each wrapped in a small typed function.

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{what}: {source}")]
    Call {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}
