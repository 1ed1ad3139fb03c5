// SPDX-License-Identifier: Apache-2.0
//! Fuzz properties of `keyward-broker`'s admin-facing parsers: the
//! configuration and policy compiler, and URL / JSON-body templates.
//!
//! One source for both runners: the cargo-fuzz targets in
//! `fuzz/fuzz_targets/` and the bounded runs of `broker/tests/fuzz.rs`
//! include this file with `#[path]`. Only public APIs are used.

use std::collections::BTreeMap;

use keyward_broker::config::Source;
use keyward_broker::policy::{Policy, TypedValue};
use keyward_broker::template::{self, BodyTemplate, Part, UrlTemplate};

/// Any text: parsing and compiling never panic, and every error names a
/// line inside the file.
pub fn config_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(src) = Source::parse("fuzz.toml", text.to_owned()) else {
        return;
    };
    if let Err(errors) = Policy::compile(&src) {
        assert!(!errors.is_empty(), "a failed compile names no error");
        for error in errors {
            let _ = error.to_string();
        }
    }
}

/// Input: a URL template, NUL, a TOML document whose `body` is a JSON-body
/// template, then NUL-separated values for the placeholders in order.
///
/// Compiling and rendering never panic. A value is *placed*, never
/// spliced: rendered with any values, a URL keeps the scheme, host, port
/// and path-segment count it has with the neutral value `x`, and a body
/// keeps the JSON shape it has with `x`.
pub fn templates(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut pieces = text.split('\0');
    let url = pieces.next().unwrap_or_default();
    let body = pieces.next().unwrap_or_default();
    let values: Vec<&str> = pieces.collect();
    let declared = |_: &str| true;
    // Every placeholder is one segment: the strictest reading, and the one
    // whose promise (the segment count never changes) the check states.
    let one_segment = |_: &str| false;

    if let Ok(parts) = template::parse(url) {
        let (hostile, neutral) = bind(&parts, &values);
        if let Ok(compiled) = UrlTemplate::compile(url, &declared, &one_segment) {
            if let (Ok(plain), Ok(placed)) = (compiled.render(&neutral), compiled.render(&hostile))
            {
                assert_eq!(placed.scheme(), plain.scheme(), "{url:?}");
                assert_eq!(placed.host_str(), Some(compiled.host()), "{url:?}");
                assert_eq!(
                    placed.port_or_known_default(),
                    plain.port_or_known_default()
                );
                assert_eq!(
                    placed.path_segments().map(Iterator::count),
                    plain.path_segments().map(Iterator::count),
                    "a value changed the path structure of {url:?}: {placed} vs {plain}"
                );
            }
        }
    }

    let Ok(doc) = body.parse::<toml::Table>() else {
        return;
    };
    let Some(value) = doc.get("body") else {
        return;
    };
    let Ok(compiled) = BodyTemplate::compile(value, &declared) else {
        return;
    };
    let mut names = Vec::new();
    collect_params(value, &mut names);
    let parts: Vec<Part> = names.into_iter().map(Part::Param).collect();
    let (hostile, neutral) = bind(&parts, &values);
    if let (Ok(plain), Ok(placed)) = (compiled.render(&neutral), compiled.render(&hostile)) {
        assert_eq!(
            shape(&placed),
            shape(&plain),
            "a value changed the body's shape"
        );
    }
}

/// Values for each placeholder in order (`x` when the input ran out), and
/// the neutral binding with `x` for all.
fn bind(
    parts: &[Part],
    values: &[&str],
) -> (BTreeMap<String, TypedValue>, BTreeMap<String, TypedValue>) {
    let mut hostile = BTreeMap::new();
    let mut neutral = BTreeMap::new();
    let mut next = values.iter();
    for part in parts {
        if let Part::Param(name) = part {
            if !hostile.contains_key(name) {
                let value = next.next().copied().unwrap_or("x");
                hostile.insert(name.clone(), TypedValue::Str(value.to_owned()));
                neutral.insert(name.clone(), TypedValue::Str("x".to_owned()));
            }
        }
    }
    (hostile, neutral)
}

fn collect_params(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::String(s) => {
            for part in template::parse(s).unwrap_or_default() {
                if let Part::Param(name) = part {
                    out.push(name);
                }
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|v| collect_params(v, out)),
        toml::Value::Table(table) => table.values().for_each(|v| collect_params(v, out)),
        _ => {}
    }
}

/// The JSON structure with every string's content erased.
fn shape(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(_) => Value::String(String::new()),
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        other => other.clone(),
    }
}
