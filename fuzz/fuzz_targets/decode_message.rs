// SPDX-License-Identifier: Apache-2.0
//! cargo-fuzz target `decode_message`: the properties of `checks/proto.rs`.
#![no_main]

// Each target uses one check of the file.
#[allow(dead_code)]
#[path = "../checks/proto.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::decode_message(data));
