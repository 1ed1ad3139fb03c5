// SPDX-License-Identifier: Apache-2.0
//! `agent-shim`: the command line is in the library ([`agent_shim::cli`]).

fn main() -> std::process::ExitCode {
    agent_shim::cli::main()
}
