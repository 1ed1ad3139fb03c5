// SPDX-License-Identifier: Apache-2.0
//! cargo-fuzz target `config_policy`: the properties of `checks/broker.rs`.
#![no_main]

// Each target uses one check of the file.
#[allow(dead_code)]
#[path = "../checks/broker.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config_policy(data));
