// SPDX-License-Identifier: Apache-2.0
//! cargo-fuzz target `token`: the properties of `checks/proto.rs`.
#![no_main]

// Each target uses one check of the file.
#[allow(dead_code)]
#[path = "../checks/proto.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::token(data));
