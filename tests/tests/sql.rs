// SPDX-License-Identifier: Apache-2.0
//! `kind = "sql"` end to end: the real broker against a real, throwaway
//! PostgreSQL 15 (keyward_tests::postgres). A parameter is only ever a
//! bind value: injection strings are refused by type or bound harmlessly,
//! and the table is checked afterwards; a READ ONLY tool cannot write; a
//! slow statement is cancelled at the timeout (on the server, and by the
//! client when the server is silent); the password never appears in any
//! output or audit record; tokens pin sql parameters.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use keyward_tests::postgres::Postgres;
use keyward_tests::{
    assert_no_secret, shim_command, Broker, BrokerSetup, Ran, PRINCIPAL_UID, SECRET, STRANGER_UID,
};

/// A password that is not `app`'s: the error it earns must not carry it.
const WRONG: &str = "kw-wrong-password-Qm9vYmFy-0a1b2c3d4e";

fn config(pg: &Postgres, silent_port: u16) -> String {
    let url = pg.url("shop");
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
state_dir = "{{dir}}/state"
call_timeout = "5s"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_call = ["tls_required", "customer_lookup", "by_name", "by_id_as_string", "rename", "slow", "all", "types", "divide", "leaky", "wrong_password", "silent", "raw_numeric"]
may_delegate = ["customer_lookup"]

[credential.shop_db]
file = "shop_db.password"

[credential.wrong_db]
file = "wrong_db.password"

[[tool]]
name = "customer_lookup"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT id, name, email FROM customers WHERE id = $1"
binds = ["id"]
read_only = true
max_rows = 100
timeout = "5s"
params.id = {{ type = "int", min = 1 }}

[[tool]]
name = "by_name"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT id, name FROM customers WHERE name = $1"
binds = ["name"]
params.name = {{ type = "string", max_len = 200 }}

[[tool]]
name = "by_id_as_string"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT id, name FROM customers WHERE id = $1"
binds = ["id"]
params.id = {{ type = "string", max_len = 200 }}

[[tool]]
name = "rename"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "UPDATE customers SET name = $2 WHERE id = $1 RETURNING id, name"
binds = ["id", "name"]
read_only = true
params.id = {{ type = "int", min = 1 }}
params.name = {{ type = "string", max_len = 200 }}

[[tool]]
name = "slow"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT 'slept' AS done FROM pg_sleep($1)"
binds = ["seconds"]
timeout = "1s"
params.seconds = {{ type = "int", min = 0, max = 60 }}

[[tool]]
name = "all"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT id, name FROM customers ORDER BY id"
max_rows = 2

[[tool]]
name = "types"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT id, active, score, visits, tags, balance::text AS balance, NULL::text AS nothing, jsonb_build_object('k', name) AS doc FROM customers WHERE id = $1"
binds = ["id"]
params.id = {{ type = "int" }}

[[tool]]
name = "raw_numeric"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT balance FROM customers WHERE id = 1"

[[tool]]
name = "divide"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT 10 / $1 AS quotient"
binds = ["by"]
params.by = {{ type = "int" }}

[[tool]]
name = "leaky"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT note FROM kw_notes"

[[tool]]
name = "wrong_password"
kind = "sql"
credential = "wrong_db"
database = "{url}"
statement = "SELECT 1 AS one"

[[tool]]
name = "tls_required"
kind = "sql"
credential = "shop_db"
database = "{url}?sslmode=verify-full"
statement = "SELECT 1 AS one"

[[tool]]
name = "silent"
kind = "sql"
credential = "shop_db"
database = "postgresql://app@127.0.0.1:{silent_port}/shop"
statement = "SELECT 1 AS one"
timeout = "1s"
"#
    )
}

struct Fixture {
    pg: std::sync::Arc<Postgres>,
    broker: Broker,
    /// Accepts connections and never answers: a server that hangs.
    _silent: std::net::TcpListener,
}

fn fixture() -> Fixture {
    let pg = Postgres::shared();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let broker = Broker::start(
        &config(&pg, port),
        &[
            ("shop_db.password", &format!("{SECRET}\n")),
            ("wrong_db.password", &format!("{WRONG}\n")),
        ],
    );
    Fixture {
        pg,
        broker,
        _silent: silent,
    }
}

impl Fixture {
    fn call(&self, uid: u32, args: &[&str]) -> Ran {
        let ran = self.broker.call(uid, args);
        self.assert_clean(&ran);
        ran
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let ran = self.call(PRINCIPAL_UID, args);
        assert_eq!(ran.code, Some(0), "{args:?}: {ran:?}");
        serde_json::from_str(&ran.stdout).unwrap()
    }

    /// The call failed (a denial or an error), saying `why`.
    fn fails(&self, args: &[&str], why: &str) -> Ran {
        let ran = self.call(PRINCIPAL_UID, args);
        assert_ne!(ran.code, Some(0), "{args:?} succeeded: {ran:?}");
        assert!(
            ran.stderr.contains(why),
            "{args:?}: expected {why:?}: {ran:?}"
        );
        ran
    }

    /// No form of the password in what the caller saw, nor in the audit;
    /// nor the connection string.
    fn assert_clean(&self, ran: &Ran) {
        let audit = self.broker.audit();
        for (what, text) in [
            ("stdout", &ran.stdout),
            ("stderr", &ran.stderr),
            ("audit", &audit),
        ] {
            assert_no_secret(what, text);
            assert!(
                !text.contains("postgresql://"),
                "{what} names the URL:\n{text}"
            );
        }
    }

    fn assert_table_intact(&self) {
        assert_eq!(self.pg.customer_rows(), Postgres::initial_rows());
    }
}

#[test]
fn a_lookup_returns_rows_as_json() {
    let f = fixture();
    let reply = f.json(&["customer_lookup", "id=2"]);
    assert_eq!(
        reply,
        serde_json::json!({
            "columns": ["id", "name", "email"],
            "rows": [{"id": 2, "name": "Grace Hopper", "email": "grace@example.com"}],
            "truncated": false,
        })
    );
    let none = f.json(&["customer_lookup", "id=99"]);
    assert_eq!(none["rows"], serde_json::json!([]));
    let types = f.json(&["types", "id=3"]);
    assert_eq!(
        types["rows"][0],
        serde_json::json!({
            "id": 3, "active": true, "score": 3.25, "visits": 3000, "tags": ["t3"],
            "balance": "30.50", "nothing": null, "doc": {"k": "Alan Turing"},
        })
    );
    // A type the kind does not show is a clear error with the fix.
    f.fails(&["raw_numeric"], "column \"balance\" has type numeric");
    // max_rows: the first two rows, flagged.
    let all = f.json(&["all"]);
    assert_eq!(
        all["rows"],
        serde_json::json!([{"id": 1, "name": "Ada Lovelace"}, {"id": 2, "name": "Grace Hopper"}])
    );
    assert_eq!(all["truncated"], true);
    let records = f.broker.audit_records();
    let allow = records
        .iter()
        .find(|r| {
            r["event"] == "call" && r["decision"] == "allow" && r["tool"] == "customer_lookup"
        })
        .unwrap();
    // Its outcome, joined by the call id: performed, rows returned.
    let outcome = records
        .iter()
        .find(|r| r["event"] == "outcome" && r["call_id"] == allow["call_id"])
        .unwrap_or_else(|| panic!("no outcome for {allow}"));
    assert_eq!(outcome["status"], 200, "{outcome}");
    assert!(outcome["bytes"].as_u64().unwrap() > 0, "{outcome}");
    assert_eq!(outcome["withheld"], false, "{outcome}");
}

#[test]
fn injection_is_refused_by_type_or_bound_as_data() {
    let f = fixture();
    let attacks = [
        "1 OR 1=1",
        "1; DROP TABLE customers; --",
        "'; DROP TABLE customers; --",
        "' OR '1'='1",
        "1 UNION SELECT 1, rolname FROM pg_roles",
        "1); DELETE FROM customers; --",
        "$$; DROP TABLE customers; $$",
        "Ada Lovelace' --",
        "\\'; TRUNCATE customers; --",
    ];
    for attack in attacks {
        // A string parameter where the statement takes text: bound as one
        // value, which no customer is called.
        let reply = f.json(&["by_name", &format!("name={attack}")]);
        assert_eq!(reply["rows"], serde_json::json!([]), "{attack:?}: {reply}");
        f.assert_table_intact();
    }
    for attack in attacks {
        // An int parameter: refused by the policy, before any SQL.
        let ran = f.call(PRINCIPAL_UID, &["customer_lookup", &format!("id={attack}")]);
        assert_eq!(ran.code, Some(3), "{attack:?}: {ran:?}");
        // A string parameter where the statement takes an integer: refused
        // by the type the server says $1 takes.
        let ran = f.fails(
            &["by_id_as_string", &format!("id={attack}")],
            "is a string, but $1 of the statement takes int4",
        );
        assert_eq!(ran.code, Some(3), "{ran:?}");
        f.assert_table_intact();
    }
    // The real name matches: the value really is compared, as data.
    let reply = f.json(&["by_name", "name=Ada Lovelace"]);
    assert_eq!(
        reply["rows"],
        serde_json::json!([{"id": 1, "name": "Ada Lovelace"}])
    );
    // Out of the statement's range: refused, not wrapped.
    f.fails(&["customer_lookup", "id=4294967297"], "out of range");
}

#[test]
fn a_write_through_a_read_only_tool_fails() {
    let f = fixture();
    f.fails(
        &["rename", "id=1", "name=Mallory"],
        "cannot execute UPDATE in a read-only transaction",
    );
    f.assert_table_intact();
}

#[test]
fn a_slow_statement_is_cancelled_at_the_timeout() {
    let f = fixture();
    let start = Instant::now();
    f.fails(&["slow", "seconds=30"], "1s");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // Nothing of it still runs on the server.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = f.pg.psql_as_superuser(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep%' AND state = 'active' AND pid <> pg_backend_pid()",
        );
        if running.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pg_sleep still running: {running}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A short one within the timeout succeeds.
    assert_eq!(f.json(&["slow", "seconds=0"])["rows"][0]["done"], "slept");
}

#[test]
fn a_silent_server_is_given_up_at_the_timeout() {
    let f = fixture();
    let start = Instant::now();
    // Bounded here too: without the broker's own deadline the call would
    // hang, and the test must fail rather than hang.
    let mut child = shim_command(&f.broker.socket, PRINCIPAL_UID, &["call", "silent"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(15) {
            child.kill().unwrap();
            panic!("the call to a silent server was not given up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ran = Ran::from(child.wait_with_output().unwrap());
    f.assert_clean(&ran);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("did not answer within 1s"), "{ran:?}");
}

#[test]
fn verify_full_never_falls_back_to_plaintext() {
    // The test server has no TLS: a tool that asks for verify-full must
    // fail to connect, not send its login in the clear.
    let f = fixture();
    f.fails(&["tls_required"], "TLS");
}

#[test]
fn a_password_in_the_url_is_refused_at_start_without_echoing_it() {
    let pg = Postgres::shared();
    let url = format!("postgresql://app:{SECRET}@127.0.0.1:{}/shop", pg.port);
    let config = format!(
        r#"
[broker]
socket = "{{socket}}"
credentials_dir = "{{dir}}/creds"

[credential.shop_db]
file = "shop_db.password"

[[tool]]
name = "leaky_url"
kind = "sql"
credential = "shop_db"
database = "{url}"
statement = "SELECT 1 AS one"
"#
    );
    let password = format!("{SECRET}\n");
    let mut broker = Broker::spawn(BrokerSetup {
        config: &config,
        credentials: &[("shop_db.password", &password)],
        ..BrokerSetup::default()
    });
    let status = broker.wait_exit();
    assert!(!status.success());
    let stderr = broker.stderr();
    assert!(stderr.contains("database: carries a password"), "{stderr}");
    assert_no_secret("stderr", &stderr);
}

#[test]
fn errors_carry_neither_password_nor_connection_string() {
    let f = fixture();
    // The server's own message reaches the caller.
    f.fails(&["divide", "by=0"], "division by zero");
    // Authentication failure: said, without either password.
    let ran = f.fails(&["wrong_password"], "password authentication failed");
    for text in [&ran.stdout, &ran.stderr, &f.broker.audit()] {
        assert!(!text.contains(WRONG), "the wrong password leaked:\n{text}");
    }
}

#[test]
fn a_result_carrying_the_password_is_withheld() {
    let f = fixture();
    f.pg.psql_as_superuser(
        "shop",
        &format!(
            "CREATE TABLE IF NOT EXISTS kw_notes (note text); GRANT SELECT ON kw_notes TO app;\n\
             DELETE FROM kw_notes; INSERT INTO kw_notes VALUES ('the password is {SECRET}');"
        ),
    );
    f.fails(&["leaky"], "withheld");
}

#[test]
fn tokens_pin_sql_parameters() {
    let f = fixture();
    let sub = STRANGER_UID.to_string();
    let minted = Ran::from(f.broker.shim(
        PRINCIPAL_UID,
        &[
            "mint",
            "--tool",
            "customer_lookup",
            "--param",
            "id=2",
            "--for-uid",
            &sub,
        ],
    ));
    assert_eq!(minted.code, Some(0), "{minted:?}");
    let token = minted.stdout.trim();
    let call = |id: &str| {
        Ran::from(f.broker.shim(
            STRANGER_UID,
            &[
                "call",
                "--token",
                token,
                "customer_lookup",
                &format!("id={id}"),
            ],
        ))
    };
    let ok = call("2");
    assert_eq!(ok.code, Some(0), "{ok:?}");
    assert!(ok.stdout.contains("Grace Hopper"), "{ok:?}");
    for other in ["3", "1 OR 1=1", "2 OR 1=1"] {
        let denied = call(other);
        assert_eq!(denied.code, Some(3), "{other:?}: {denied:?}");
        assert!(!denied.stdout.contains("Ada"), "{denied:?}");
    }
    f.assert_clean(&ok);
}
