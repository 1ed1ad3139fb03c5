// SPDX-License-Identifier: Apache-2.0
//! The accept loop.

/// Shared broker state.
#[derive(Debug)]
pub struct Broker {}

/// Serve until shutdown.
pub async fn serve() {}
