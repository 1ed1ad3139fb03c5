// SPDX-License-Identifier: Apache-2.0
//! Turning `mint` and `attenuate` command-line options into the broker's
//! `Mint` and `Attenuate` requests. Values stay strings: the broker
//! converts them to each parameter's declared type and checks them against
//! the tool's policy.

use std::time::Duration;

use keyward_proto::token::{Audience, Constraint, ParamConstraint};
use keyward_proto::{Attenuate, Mint, Value};

/// The constraint options shared by `mint` and `attenuate`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ConstraintArgs {
    /// Pin parameter NAME to exactly VALUE.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub exact: Vec<String>,
    /// Parameter NAME must start with P.
    #[arg(long = "prefix", value_name = "NAME=P")]
    pub prefix: Vec<String>,
    /// Parameter NAME must wholly match the regex RE.
    #[arg(long = "pattern", value_name = "NAME=RE")]
    pub pattern: Vec<String>,
    /// Parameter NAME must be one of the comma-separated values.
    #[arg(long = "one-of", value_name = "NAME=A,B,...")]
    pub one_of: Vec<String>,
    /// Int parameter NAME must lie in MIN..MAX (inclusive).
    #[arg(long = "range", value_name = "NAME=MIN..MAX")]
    pub range: Vec<String>,
    /// Lifetime, e.g. 5m or 90s (never more than the policy's cap).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// How many calls the token may make.
    #[arg(long)]
    pub uses: Option<u32>,
    /// The task description; its hash joins every audit record of the task.
    #[arg(long)]
    pub task: Option<String>,
}

/// A malformed option, named.
#[derive(Debug, thiserror::Error)]
#[error("{option} {value:?}: {message}")]
pub struct OptionError {
    option: &'static str,
    value: String,
    message: &'static str,
}

fn split<'a>(option: &'static str, value: &'a str) -> Result<(&'a str, &'a str), OptionError> {
    match value.split_once('=') {
        Some((name, rest)) if !name.is_empty() => Ok((name, rest)),
        _ => Err(OptionError {
            option,
            value: value.to_owned(),
            message: "expected NAME=...",
        }),
    }
}

impl ConstraintArgs {
    /// Every constraint given, in option order.
    pub fn constraints(&self) -> Result<Vec<ParamConstraint>, OptionError> {
        let mut out = Vec::new();
        let mut push = |name: &str, constraint| {
            out.push(ParamConstraint {
                name: name.to_owned(),
                constraint,
            })
        };
        for v in &self.exact {
            let (name, value) = split("--param", v)?;
            push(name, Constraint::Exact(Value::Str(value.to_owned())));
        }
        for v in &self.prefix {
            let (name, p) = split("--prefix", v)?;
            push(name, Constraint::Prefix(p.to_owned()));
        }
        for v in &self.pattern {
            let (name, re) = split("--pattern", v)?;
            push(name, Constraint::Pattern(re.to_owned()));
        }
        for v in &self.one_of {
            let (name, list) = split("--one-of", v)?;
            let values = list.split(',').map(|s| Value::Str(s.to_owned())).collect();
            push(name, Constraint::OneOf(values));
        }
        for v in &self.range {
            let (name, range) = split("--range", v)?;
            let bad = || OptionError {
                option: "--range",
                value: v.clone(),
                message: "expected NAME=MIN..MAX with integers",
            };
            let (min, max) = range.split_once("..").ok_or_else(bad)?;
            let min = min.parse().map_err(|_| bad())?;
            let max = max.trim_start_matches('=').parse().map_err(|_| bad())?;
            push(name, Constraint::Range { min, max });
        }
        Ok(out)
    }
}

/// `agent-shim mint`: the tools, and constraints for whichever of them
/// has each parameter.
pub fn mint_request(
    tools: &[String],
    args: &ConstraintArgs,
    for_uid: Option<u32>,
    for_gid: Option<u32>,
    exact_call: bool,
) -> Result<Mint, OptionError> {
    Ok(Mint {
        tools: tools.to_vec(),
        params: args.constraints()?,
        ttl_secs: args.ttl.map(|d| d.as_secs()),
        max_uses: args.uses,
        task: args.task.clone().unwrap_or_default(),
        audience: for_uid.map(|uid| Audience { uid, gid: for_gid }),
        exact_call,
    })
}

/// `agent-shim attenuate`. The child keeps its parent's task.
pub fn attenuate_request(
    tools: &[String],
    args: &ConstraintArgs,
) -> Result<Attenuate, OptionError> {
    if let Some(task) = &args.task {
        return Err(OptionError {
            option: "--task",
            value: task.clone(),
            message: "an attenuated token keeps its parent's task",
        });
    }
    Ok(Attenuate {
        tools: tools.to_vec(),
        params: args.constraints()?,
        ttl_secs: args.ttl.map(|d| d.as_secs()),
        max_uses: args.uses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_constraints() {
        let args = ConstraintArgs {
            exact: vec!["to=a@example.com".into()],
            one_of: vec!["fmt=plain,html".into()],
            range: vec!["n=1..5".into()],
            ttl: Some(Duration::from_secs(60)),
            ..ConstraintArgs::default()
        };
        let mint = mint_request(&["send_email".into()], &args, Some(7), None, false).unwrap();
        assert_eq!(mint.ttl_secs, Some(60));
        assert_eq!(mint.audience, Some(Audience { uid: 7, gid: None }));
        let params = &mint.params;
        assert_eq!(params.len(), 3);
        assert_eq!(params[2].constraint, Constraint::Range { min: 1, max: 5 });
    }

    #[test]
    fn malformed_options_are_named() {
        let args = ConstraintArgs {
            range: vec!["n=1-5".into()],
            ..ConstraintArgs::default()
        };
        let err = args.constraints().unwrap_err().to_string();
        assert!(err.contains("--range"), "{err}");
        let args = ConstraintArgs {
            exact: vec!["novalue".into()],
            ..ConstraintArgs::default()
        };
        assert!(args.constraints().is_err());
    }
}
