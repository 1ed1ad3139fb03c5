// SPDX-License-Identifier: Apache-2.0
//! The token authority in process: a real state directory (a temp dir),
//! policies compiled from text, and an injected clock.

use std::os::unix::fs::PermissionsExt;

use keyward_proto::token::{Constraint, ParamConstraint};
use keyward_proto::{Attenuate, Call, Mint, Param, Value};

use super::*;
use crate::config::Source;
use crate::credential::Credentials;

const POLICY: &str = r#"
[broker]
socket = "/tmp/unused.sock"
max_token_ttl = "10m"
admin_uids = [900]

[[principal]]
name = "orch"
uids = [1000]
may_call = ["echo"]
may_delegate = ["echo", "mail"]

[[principal]]
name = "other"
uids = [1001]
may_delegate = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }

[[tool]]
name = "mail"
kind = "echo"
params.to = { type = "string", max_len = 100 }

[[tool]]
name = "internal"
kind = "echo"
"#;

const T0: u64 = 1_900_000_000;
const ORCH: Caller = Caller::new(1000, 1000);
const AGENT: Caller = Caller::new(2000, 2000);

fn policy(text: &str) -> Policy {
    Policy::compile(&Source::parse("t.toml", text.to_owned()).unwrap()).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    tokens: Tokens,
    policy: Policy,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let policy = policy(POLICY);
    let tokens = Tokens::open(&policy, dir.path(), &Credentials::default()).unwrap();
    Fixture {
        _dir: dir,
        tokens,
        policy,
    }
}

fn request(tools: &[&str]) -> Mint {
    Mint {
        tools: tools.iter().map(|t| t.to_string()).collect(),
        params: Vec::new(),
        ttl_secs: Some(300),
        max_uses: None,
        task: "t".into(),
        audience: Some(Audience {
            uid: AGENT.uid,
            gid: None,
        }),
        exact_call: false,
    }
}

fn echo(message: &str) -> Call {
    Call {
        tool: "echo".into(),
        params: vec![Param {
            name: "message".into(),
            value: Value::Str(message.into()),
        }],
    }
}

fn narrow() -> Attenuate {
    Attenuate {
        tools: Vec::new(),
        params: Vec::new(),
        ttl_secs: None,
        max_uses: None,
    }
}

impl Fixture {
    fn mint(&self, request: &Mint) -> Minted {
        self.tokens
            .mint(&self.policy, &ORCH, request, T0)
            .unwrap_or_else(|d| panic!("{d}"))
    }

    fn bind(&self, minted: &Minted, caller: &Caller, now: u64) -> Result<BoundToken, String> {
        self.tokens
            .verify(caller, &minted.token, now)
            .map_err(|r| r.denial.to_string())
    }

    fn call(&self, bound: &BoundToken, call: &Call, now: u64) -> Result<(), String> {
        self.tokens
            .authorize(&self.policy, &AGENT, bound, call, now)
            .map(drop)
            .map_err(|d| d.to_string())
    }
}

#[test]
fn mint_stays_within_delegation_ttl_and_principals() {
    let f = fixture();
    let denied = |caller: &Caller, r: &Mint| {
        f.tokens
            .mint(&f.policy, caller, r, T0)
            .unwrap_err()
            .to_string()
    };
    assert!(denied(&AGENT, &request(&["echo"])).contains("is not a principal"));
    assert!(denied(&ORCH, &request(&["internal"])).contains("may not delegate tool"));
    let caller = Caller::new(1001, 1);
    assert!(denied(&caller, &request(&["mail"])).contains("may not delegate"));
    let long = Mint {
        ttl_secs: Some(3600),
        ..request(&["echo"])
    };
    assert!(denied(&ORCH, &long).contains("exceeds the policy's max_token_ttl"));
    let zero = Mint {
        max_uses: Some(0),
        ..request(&["echo"])
    };
    assert!(denied(&ORCH, &zero).contains("max_uses of zero"));
    let minted = f.mint(&request(&["echo"]));
    assert_eq!(minted.expires, T0 + 300);
    let record = f.tokens.state.minted(&minted.id).unwrap();
    assert_eq!((record.issuer.as_str(), record.owner), ("orch", ORCH.uid));
}

#[test]
fn a_token_is_bound_only_by_its_audience_within_its_lifetime() {
    let f = fixture();
    let minted = f.mint(&request(&["echo"]));
    assert!(f.bind(&minted, &AGENT, T0).is_ok());
    assert!(f
        .bind(&minted, &ORCH, T0)
        .unwrap_err()
        .contains("issued for uid 2000, not uid 1000"));
    assert!(f
        .bind(&minted, &AGENT, T0 + 300)
        .unwrap_err()
        .contains("has expired"));
    // A clock that steps back after a later time was seen does not make
    // it valid again.
    assert!(f
        .bind(&minted, &AGENT, T0 + 10)
        .unwrap_err()
        .contains("has expired"));
    let mut tampered = minted.token.clone();
    tampered.pop();
    tampered.push('A');
    let forged = Minted {
        token: tampered,
        ..minted
    };
    assert!(f.bind(&forged, &AGENT, T0).is_err());
}

#[test]
fn authorize_checks_grant_constraints_and_current_delegation() {
    let f = fixture();
    let pinned = Mint {
        params: vec![ParamConstraint {
            name: "message".into(),
            constraint: Constraint::Prefix("ok-".into()),
        }],
        ..request(&["echo"])
    };
    let bound = f.bind(&f.mint(&pinned), &AGENT, T0).unwrap();
    f.call(&bound, &echo("ok-1"), T0).unwrap();
    assert!(f
        .call(&bound, &echo("bad"), T0)
        .unwrap_err()
        .contains("limits parameter \"message\""));
    let mail = Call {
        tool: "mail".into(),
        params: Vec::new(),
    };
    assert!(f
        .call(&bound, &mail, T0)
        .unwrap_err()
        .contains("does not grant tool"));
    // The issuer loses the right to delegate: tokens already out stop.
    let narrowed = policy(&POLICY.replace(
        r#"may_delegate = ["echo", "mail"]"#,
        r#"may_delegate = ["mail"]"#,
    ));
    let denied = f
        .tokens
        .authorize(&narrowed, &AGENT, &bound, &echo("ok-2"), T0)
        .unwrap_err();
    assert!(
        denied.to_string().contains("may no longer delegate"),
        "{denied:?}"
    );
}

#[test]
fn uses_are_counted_and_persist() {
    let f = fixture();
    let counted = Mint {
        max_uses: Some(2),
        ..request(&["echo"])
    };
    let minted = f.mint(&counted);
    let bound = f.bind(&minted, &AGENT, T0).unwrap();
    assert!(bound.counts_uses());
    f.call(&bound, &echo("a"), T0).unwrap();
    f.call(&bound, &echo("b"), T0).unwrap();
    assert!(f
        .call(&bound, &echo("c"), T0)
        .unwrap_err()
        .contains("used all of its 2 uses"));
    // A denied call (policy) uses nothing.
    let other = f.bind(&f.mint(&counted), &AGENT, T0).unwrap();
    let long = "x".repeat(200);
    assert!(f.call(&other, &echo(&long), T0).is_err());
    assert_eq!(f.tokens.state.uses(&other.id()), 0);
}

#[test]
fn attenuation_narrows_and_its_uses_count_against_the_parent() {
    let f = fixture();
    let parent = f.mint(&Mint {
        max_uses: Some(3),
        ..request(&["echo", "mail"])
    });
    let bound = f.bind(&parent, &AGENT, T0).unwrap();
    f.call(&bound, &echo("a"), T0).unwrap();
    let refuse = |a: &Attenuate| {
        f.tokens
            .attenuate(&f.policy, &AGENT, &bound, a, T0)
            .unwrap_err()
            .to_string()
    };
    let longer = Attenuate {
        ttl_secs: Some(3600),
        ..narrow()
    };
    assert!(refuse(&longer).contains("outlive its parent"));
    let more = Attenuate {
        max_uses: Some(5),
        ..narrow()
    };
    assert!(refuse(&more).contains("5 uses asked, but the token has only 2 left"));
    let widen = Attenuate {
        tools: vec!["internal".into()],
        ..narrow()
    };
    assert!(refuse(&widen).contains("does not grant tool"));
    let child = f
        .tokens
        .attenuate(
            &f.policy,
            &AGENT,
            &bound,
            &Attenuate {
                tools: vec!["echo".into()],
                ..narrow()
            },
            T0,
        )
        .unwrap();
    let record = f.tokens.state.minted(&child.id).unwrap();
    assert!(record.attenuated);
    assert_eq!(record.max_uses, Some(2), "the parent's remaining uses");
    let child = f.bind(&child, &AGENT, T0).unwrap();
    assert_eq!(child.verified.body.lineage, vec![parent.id]);
    assert!(f
        .call(
            &child,
            &Call {
                tool: "mail".into(),
                params: Vec::new()
            },
            T0
        )
        .is_err());
    f.call(&child, &echo("b"), T0).unwrap();
    f.call(&bound, &echo("c"), T0).unwrap();
    // The parent is used up, so the child is too.
    let denied = f.call(&child, &echo("d"), T0).unwrap_err();
    assert!(
        denied.contains(&format!("parent {} with no uses left", parent.id)),
        "{denied}"
    );
}

#[test]
fn one_session_attenuates_a_bounded_number_of_times() {
    let f = fixture();
    let bound = f.bind(&f.mint(&request(&["echo"])), &AGENT, T0).unwrap();
    for _ in 0..MAX_ATTENUATIONS_PER_SESSION {
        f.tokens
            .attenuate(&f.policy, &AGENT, &bound, &narrow(), T0)
            .unwrap();
    }
    let denied = f
        .tokens
        .attenuate(&f.policy, &AGENT, &bound, &narrow(), T0)
        .unwrap_err();
    assert!(denied
        .to_string()
        .contains("this session has already attenuated"));
}

#[test]
fn revocation_by_whom_and_down_the_lineage() {
    let f = fixture();
    let parent = f.mint(&request(&["echo"]));
    let bound = f.bind(&parent, &AGENT, T0).unwrap();
    let child = f
        .tokens
        .attenuate(&f.policy, &AGENT, &bound, &narrow(), T0)
        .unwrap();
    let child = f.bind(&child, &AGENT, T0).unwrap();
    let revoke = |caller: &Caller, id: TokenId| {
        f.tokens
            .revoke(&f.policy, caller, id, T0)
            .map_err(|d| d.to_string())
    };
    assert!(revoke(&AGENT, parent.id)
        .unwrap_err()
        .contains("only root, an admin uid or its issuer \"orch\""));
    assert!(revoke(&Caller::new(1001, 1), parent.id).is_err());
    assert!(revoke(&ORCH, TokenId([7; 16]))
        .unwrap_err()
        .contains("did not mint it"));
    // An admin revoking an id this broker never issued (its key is its
    // own, so nobody else could have) is told so.
    assert!(revoke(&Caller::new(900, 900), TokenId([7; 16]))
        .unwrap_err()
        .contains("never issued it"));
    revoke(&ORCH, parent.id).unwrap();
    assert!(f
        .call(&bound, &echo("a"), T0)
        .unwrap_err()
        .contains("has been revoked"));
    let denied = f.call(&child, &echo("a"), T0).unwrap_err();
    assert!(
        denied.contains(&format!("its parent token {} has been revoked", parent.id)),
        "{denied}"
    );
}

#[test]
fn the_attenuation_cap_is_per_uid_across_sessions() {
    let f = fixture();
    let capped = policy(&POLICY.replace(
        "admin_uids = [900]",
        "admin_uids = [900]\nmax_attenuations_per_uid = 3",
    ));
    let minted = f.mint(&request(&["echo"]));
    let mut made = 0;
    let denial = loop {
        // A fresh session each time: the per-session cap never applies.
        let bound = f.bind(&minted, &AGENT, T0).unwrap();
        match f.tokens.attenuate(&capped, &AGENT, &bound, &narrow(), T0) {
            Ok(_) => made += 1,
            Err(d) => break d.to_string(),
        }
        assert!(made <= 3, "past the cap");
    };
    assert_eq!(made, 3);
    assert_eq!(
        denial,
        "attenuation denied: uid 2000 already holds 3 live attenuated tokens (max_attenuations_per_uid)"
    );
    // Once they expire, the uid may attenuate again.
    let later = T0 + 300 + 120;
    let fresh = f
        .tokens
        .mint(&f.policy, &ORCH, &request(&["echo"]), later)
        .unwrap();
    let bound = f.bind(&fresh, &AGENT, later).unwrap();
    f.tokens
        .attenuate(&capped, &AGENT, &bound, &narrow(), later)
        .unwrap();
}
