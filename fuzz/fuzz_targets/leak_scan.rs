// SPDX-License-Identifier: Apache-2.0
//! cargo-fuzz target `leak_scan`: the properties of `checks/leak.rs`.
#![no_main]

#[path = "../checks/leak.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::leak_scan(data));
