// SPDX-License-Identifier: Apache-2.0
//! Constraints: checking a requested constraint against a tool's policy
//! (and, when attenuating, against the constraints a token already has),
//! deciding whether a value satisfies one, and saying one in words.

use keyward_proto::token::{Constraint, Grant, ParamConstraint};
use keyward_proto::{Check, ParamInfo, ToolInfo, ToolKind, Value};

use crate::config::ParamType;
use crate::policy::{
    compile_pattern, describe_rule, path, show_str, type_name, ParamSpec, Policy, Tool, TypedValue,
};

use super::MAX_CONSTRAINTS;

pub(super) fn describe_tool(tool: &Tool, constraints: &[ParamConstraint]) -> ToolInfo {
    ToolInfo {
        kind: if tool.action.kind() == "gateway" {
            ToolKind::Gateway
        } else {
            ToolKind::Tool
        },
        name: tool.name.clone(),
        description: tool.description.clone().unwrap_or_default(),
        params: tool
            .params
            .iter()
            .map(|(name, spec)| ParamInfo {
                name: name.clone(),
                ty: type_name(spec.ty).to_owned(),
                required: spec.default.is_none(),
                rules: spec
                    .rules
                    .iter()
                    .map(|r| rule_text(r, spec.secret))
                    .chain(constraints.iter().filter(|c| c.name == *name).map(|c| {
                        format!("token: {}", describe_constraint(&c.constraint, spec.secret))
                    }))
                    .collect(),
                default: spec
                    .default
                    .as_ref()
                    .filter(|_| !spec.secret)
                    .map(TypedValue::to_wire),
                checks: spec
                    .rules
                    .iter()
                    .filter_map(|r| rule_check(r, spec.secret))
                    .collect(),
                constraints: constraints
                    .iter()
                    .filter(|c| c.name == *name)
                    .map(|c| &c.constraint)
                    .filter(|c| !spec.secret || matches!(c, Constraint::Range { .. }))
                    .cloned()
                    .collect(),
            })
            .collect(),
    }
}

/// A policy rule as data, for programs that build schemas; `None` for the
/// segment rule (implied by the `path` type) and for a rule that would show
/// a secret parameter's values.
fn rule_check(rule: &crate::policy::Rule, secret: bool) -> Option<Check> {
    use crate::policy::Rule;
    Some(match rule {
        Rule::MaxLen(n) => Check::MaxLen(u64::try_from(*n).unwrap_or(u64::MAX)),
        Rule::Min(n) => Check::Min(*n),
        Rule::Max(n) => Check::Max(*n),
        Rule::Segments => return None,
        _ if secret => return None,
        Rule::Pattern(re) => Check::Pattern(written_pattern(re).to_owned()),
        Rule::OneOf(values) => Check::OneOf(values.iter().map(TypedValue::to_wire).collect()),
        Rule::Prefix(p) => Check::Prefix(p.clone()),
        Rule::PathPrefix(p) => Check::PathPrefix(p.clone()),
    })
}

/// A pattern as the admin wrote it (it is compiled anchored as
/// `^(?:PATTERN)$`).
fn written_pattern(re: &regex::Regex) -> &str {
    let full = re.as_str();
    full.strip_prefix("^(?:")
        .and_then(|p| p.strip_suffix(")$"))
        .unwrap_or(full)
}

fn rule_text(rule: &crate::policy::Rule, secret: bool) -> String {
    use crate::policy::Rule;
    match rule {
        Rule::Pattern(re) if !secret => format!("pattern {}", written_pattern(re)),
        Rule::MaxLen(n) => format!("max_len {n}"),
        Rule::Min(n) => format!("min {n}"),
        Rule::Max(n) => format!("max {n}"),
        other => describe_rule(other, secret)
            .trim_start_matches("is not ")
            .trim_start_matches("does not ")
            .to_owned(),
    }
}

/// A constraint in words, e.g. `exactly "a@example.com"`.
pub fn describe_constraint(c: &Constraint, secret: bool) -> String {
    let value = |v: &Value| match (v, secret) {
        (_, true) => "[secret]".to_owned(),
        (Value::Str(s), false) => show_str(s),
        (Value::Int(i), false) => i.to_string(),
        (Value::Bool(b), false) => b.to_string(),
    };
    match c {
        Constraint::Any => "any value".into(),
        Constraint::Exact(v) => format!("exactly {}", value(v)),
        Constraint::OneOf(vs) => format!(
            "one of ({})",
            vs.iter().map(value).collect::<Vec<_>>().join(", ")
        ),
        Constraint::Prefix(p) if secret => format!("a prefix of {} bytes", p.len()),
        Constraint::Prefix(p) => format!("prefix {}", show_str(p)),
        Constraint::Pattern(_) if secret => "a pattern".into(),
        Constraint::Pattern(p) => format!("pattern {}", show_str(p)),
        Constraint::Range { min, max } => format!("range {min}..={max}"),
    }
}

/// Add each requested constraint to every grant whose tool has the
/// parameter, checked against the tool's policy (values converted to the
/// parameter's type) and, when `narrowing`, against the constraints the
/// grant already has: one that provably admits more is refused.
pub(super) fn add_constraints(
    policy: &Policy,
    grants: &mut [Grant],
    requested: &[ParamConstraint],
    narrowing: bool,
) -> Result<(), String> {
    for pc in requested {
        let mut applied = false;
        for grant in grants.iter_mut() {
            let Some(tool) = policy.tool(&grant.tool) else {
                continue;
            };
            let Some(spec) = tool.params.get(&pc.name) else {
                continue;
            };
            let constraint = normalize_constraint(tool, &pc.name, spec.ty, &pc.constraint)?;
            let is_path = spec.ty == ParamType::Path;
            if narrowing {
                for existing in grant.params.iter().filter(|e| e.name == pc.name) {
                    if is_wider(&constraint, &existing.constraint, is_path) {
                        return Err(format!(
                            "{} for parameter {:?} of tool {} is wider than the token's {}",
                            describe_constraint(&constraint, spec.secret),
                            pc.name,
                            tool.name,
                            describe_constraint(&existing.constraint, spec.secret)
                        ));
                    }
                }
            }
            grant.params.push(ParamConstraint {
                name: pc.name.clone(),
                constraint,
            });
            if grant.params.len() > MAX_CONSTRAINTS {
                return Err(format!("more than {MAX_CONSTRAINTS} constraints"));
            }
            applied = true;
        }
        if !applied {
            return Err(format!(
                "no tool of the token has a parameter {}",
                show_str(&pc.name)
            ));
        }
    }
    Ok(())
}

/// Check one constraint against the tool's policy for that parameter:
/// values must pass the policy (so converted to its type), ranges must lie
/// within its min/max, prefixes must extend its prefix. A constraint that
/// could admit a value the policy refuses is "wider" and refused.
fn normalize_constraint(
    tool: &Tool,
    name: &str,
    ty: ParamType,
    constraint: &Constraint,
) -> Result<Constraint, String> {
    use crate::policy::Rule;
    let spec = tool
        .params
        .get(name)
        .ok_or_else(|| format!("tool {} has no parameter {}", tool.name, show_str(name)))?;
    let wider = |what: String| {
        format!(
            "{what} for parameter {name:?} is wider than the policy of tool {}",
            tool.name
        )
    };
    let check_value = |v: &Value| -> Result<Value, String> {
        tool.check_param(name, v)
            .map(|(_, typed)| typed.to_wire())
            .map_err(|d| d.why)
    };
    let is_path = ty == ParamType::Path;
    let type_is = |want: ParamType, what: &str| -> Result<(), String> {
        // A path is a string with more rules.
        if ty == want || (want == ParamType::String && is_path) {
            Ok(())
        } else {
            Err(format!(
                "a {what} constraint does not fit parameter {name:?} of type {}",
                type_name(ty)
            ))
        }
    };
    Ok(match constraint {
        Constraint::Any => Constraint::Any,
        Constraint::Exact(v) => Constraint::Exact(check_value(v)?),
        Constraint::OneOf(vs) => {
            if vs.is_empty() {
                return Err(format!("an empty one_of for parameter {name:?}"));
            }
            Constraint::OneOf(vs.iter().map(check_value).collect::<Result<_, _>>()?)
        }
        Constraint::Range { min, max } => {
            type_is(ParamType::Int, "range")?;
            if min > max {
                return Err(format!("range {min}..={max} for {name:?} is empty"));
            }
            for rule in &spec.rules {
                match rule {
                    Rule::Min(pmin) if min < pmin => {
                        return Err(wider(format!("range {min}..={max} (policy min {pmin})")))
                    }
                    Rule::Max(pmax) if max > pmax => {
                        return Err(wider(format!("range {min}..={max} (policy max {pmax})")))
                    }
                    _ => {}
                }
            }
            Constraint::Range {
                min: *min,
                max: *max,
            }
        }
        Constraint::Prefix(p) => {
            type_is(ParamType::String, "prefix")?;
            // A path prefix is whole segments, kept in canonical form so
            // that comparing two of them as strings compares segments.
            let p = &if is_path {
                path::canonical_prefix(p).map_err(|fault| {
                    format!(
                        "prefix for {name:?} is not a prefix of whole path segments: it {}",
                        fault.describe(true)
                    )
                })?
            } else {
                p.clone()
            };
            for rule in &spec.rules {
                match rule {
                    Rule::PathPrefix(pp) if !path::has_prefix(p, pp) => {
                        return Err(wider(if spec.secret {
                            "a prefix that does not extend the policy's".to_owned()
                        } else {
                            format!("prefix {} (policy prefix {})", show_str(p), show_str(pp))
                        }))
                    }
                    Rule::Prefix(pp) if !p.starts_with(pp.as_str()) => {
                        return Err(wider(if spec.secret {
                            "a prefix that does not extend the policy's".to_owned()
                        } else {
                            format!("prefix {} (policy prefix {})", show_str(p), show_str(pp))
                        }))
                    }
                    Rule::MaxLen(n) if p.len() > *n => {
                        return Err(format!(
                            "prefix for {name:?} is longer than its max_len of {n}"
                        ))
                    }
                    Rule::OneOf(values)
                        if !values.iter().any(
                            |v| matches!(v, TypedValue::Str(s) if prefix_admits(p, s, is_path)),
                        ) =>
                    {
                        return Err(format!(
                            "prefix for {name:?} matches none of the policy's allowed values"
                        ))
                    }
                    _ => {}
                }
            }
            Constraint::Prefix(p.clone())
        }
        Constraint::Pattern(p) => {
            type_is(ParamType::String, "pattern")?;
            compile_pattern(p).map_err(|_| format!("pattern for {name:?} is not a valid regex"))?;
            // The policy's own pattern still applies at every use, so a
            // token pattern can only intersect it.
            Constraint::Pattern(p.clone())
        }
    })
}

/// Whether a prefix admits a string value: for a `path` parameter, on
/// whole segments ([`path::has_prefix`]), else on bytes.
pub(super) fn prefix_admits(prefix: &str, value: &str, is_path: bool) -> bool {
    if is_path {
        path::has_prefix(value, prefix)
    } else {
        value.starts_with(prefix)
    }
}

/// Whether a prefix constraint on this parameter admits a value, judged
/// as [`prefix_admits`] on the parameter's type.
pub(super) fn prefix_satisfied(spec: Option<&ParamSpec>, prefix: &str, value: &str) -> bool {
    prefix_admits(prefix, value, spec.is_some_and(|s| s.ty == ParamType::Path))
}

/// Whether `new` provably admits a value `existing` refuses (checked where
/// it can be decided; patterns are intersected at use instead).
fn is_wider(new: &Constraint, existing: &Constraint, is_path: bool) -> bool {
    use Constraint::*;
    let values_outside = |vs: &[Value]| {
        vs.iter()
            .any(|v| !admits(existing, v, is_path).unwrap_or(true))
    };
    match (new, existing) {
        (_, Any) => false,
        (Any, _) => true,
        (Exact(v), _) => values_outside(std::slice::from_ref(v)),
        (OneOf(vs), _) => values_outside(vs),
        (
            Range { min, max },
            Range {
                min: emin,
                max: emax,
            },
        ) => min < emin || max > emax,
        (Range { .. }, Exact(_) | OneOf(_)) => true,
        (Prefix(p), Prefix(ep)) => !prefix_admits(ep, p, is_path),
        (Prefix(_), Exact(_) | OneOf(_)) => true,
        _ => false,
    }
}

/// Whether a constraint admits a value, where decidable without a regex.
fn admits(c: &Constraint, v: &Value, is_path: bool) -> Option<bool> {
    Some(match (c, v) {
        (Constraint::Any, _) => true,
        (Constraint::Exact(e), v) => e == v,
        (Constraint::OneOf(vs), v) => vs.contains(v),
        (Constraint::Prefix(p), Value::Str(s)) => prefix_admits(p, s, is_path),
        (Constraint::Range { min, max }, Value::Int(i)) => min <= i && i <= max,
        (Constraint::Pattern(_), _) => return None,
        _ => false,
    })
}

pub(super) fn wire_eq(v: &Value, typed: &TypedValue) -> bool {
    match (v, typed) {
        (Value::Str(a), TypedValue::Str(b)) => a == b,
        (Value::Int(a), TypedValue::Int(b)) => a == b,
        (Value::Bool(a), TypedValue::Bool(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Constraint::*;

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    #[test]
    fn narrower_is_not_wider() {
        let range = Range { min: 0, max: 5 };
        assert!(!is_wider(&Range { min: 1, max: 2 }, &range, false));
        assert!(is_wider(&Range { min: 0, max: 9 }, &range, false));
        assert!(is_wider(&Range { min: -1, max: 2 }, &range, false));
        assert!(!is_wider(&Exact(Value::Int(3)), &range, false));
        assert!(is_wider(&Exact(Value::Int(6)), &range, false));
        let prefix = Prefix("ab".into());
        assert!(!is_wider(&Prefix("abc".into()), &prefix, false));
        assert!(is_wider(&Prefix("a".into()), &prefix, false));
        assert!(!is_wider(&OneOf(vec![s("abx"), s("aby")]), &prefix, false));
        assert!(is_wider(&OneOf(vec![s("abx"), s("zz")]), &prefix, false));
        let one_of = OneOf(vec![s("a"), s("b")]);
        assert!(!is_wider(&Exact(s("a")), &one_of, false));
        assert!(is_wider(&Exact(s("c")), &one_of, false));
        assert!(is_wider(&Prefix("a".into()), &one_of, false));
        assert!(is_wider(&Any, &one_of, false));
        assert!(!is_wider(&Any, &Any, false));
    }

    #[test]
    fn path_prefixes_are_whole_segments() {
        let reports = Prefix("reports/".into());
        assert!(!is_wider(&Prefix("reports/2024/".into()), &reports, true));
        assert!(is_wider(&Prefix("reports-evil/".into()), &reports, true));
        assert!(!is_wider(&Exact(s("reports/q1.txt")), &reports, true));
        assert!(!is_wider(&Exact(s("reports")), &reports, true));
        assert!(is_wider(&Exact(s("reports-evil/x")), &reports, true));
        // A prefix minted without the trailing `/` is still whole segments.
        let bare = Prefix("reports".into());
        assert!(is_wider(&Exact(s("reports-evil/x")), &bare, true));
        assert!(!is_wider(&Exact(s("reports-evil/x")), &bare, false));
        assert!(prefix_admits("reports", "reports/x", true));
        assert!(!prefix_admits("reports", "reports-evil/x", true));
        assert!(prefix_admits("reports", "reports-evil/x", false));
    }

    #[test]
    fn patterns_are_intersected_not_compared() {
        // Undecidable here: the pattern is kept and both apply at use.
        assert!(!is_wider(
            &Pattern(".*".into()),
            &Pattern("^a$".into()),
            false
        ));
        assert_eq!(admits(&Pattern("a".into()), &s("a"), false), None);
    }

    #[test]
    fn typed_values_compare_by_type() {
        assert!(wire_eq(&Value::Int(3), &TypedValue::Int(3)));
        assert!(!wire_eq(&s("3"), &TypedValue::Int(3)));
        assert!(!wire_eq(
            &Value::Bool(true),
            &TypedValue::Str("true".into())
        ));
    }

    #[test]
    fn secret_constraints_are_not_shown() {
        let shown = describe_constraint(&Exact(s("sk-live-123")), true);
        assert!(!shown.contains("sk-live"), "{shown}");
        let shown = describe_constraint(&Pattern("^sk-live-.*$".into()), true);
        assert!(!shown.contains("sk-live"), "{shown}");
        let shown = describe_constraint(&Prefix("sk-live".into()), true);
        assert!(!shown.contains("sk-live"), "{shown}");
    }
}
