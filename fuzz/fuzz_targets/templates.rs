// SPDX-License-Identifier: Apache-2.0
//! cargo-fuzz target `templates`: the properties of `checks/broker.rs`.
#![no_main]

// Each target uses one check of the file.
#[allow(dead_code)]
#[path = "../checks/broker.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::templates(data));
