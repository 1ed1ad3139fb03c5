// SPDX-License-Identifier: Apache-2.0
//! A real, throwaway PostgreSQL 15 server for the `sql` tool tests.
//!
//! `initdb` and `pg_ctl` run as the unprivileged `postgres` account that
//! Debian's package creates (initdb refuses a uid with no passwd entry) in
//! a temporary directory; the server listens on a private port on
//! 127.0.0.1 (scram-sha-256 password auth) and on a Unix socket in that
//! directory (trust, used only by the harness itself to set up the data
//! as the superuser). The role `app` has the password [`crate::SECRET`]
//! and owns the `shop` database's `customers` table, so a statement that
//! got through as SQL could really drop it. The server is stopped on drop.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};

use crate::SECRET;

/// Where Debian's `postgresql-15` puts its binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The rows the `customers` table starts with: (id, name, email).
pub const CUSTOMERS: &[(i32, &str, &str)] = &[
    (1, "Ada Lovelace", "ada@example.com"),
    (2, "Grace Hopper", "grace@example.com"),
    (3, "Alan Turing", "alan@example.com"),
];

/// A running PostgreSQL server; stopped (immediately) on drop.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    uid: u32,
    gid: u32,
}

impl Postgres {
    /// The server the tests of one binary share while any of them holds
    /// it: starting one takes seconds, so tests that run together use one,
    /// and the last to finish stops it. Tests that share it must leave the
    /// `customers` table as it started.
    pub fn shared() -> Arc<Postgres> {
        static SHARED: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pg) = shared.upgrade() {
            return pg;
        }
        let pg = Arc::new(Postgres::start());
        *shared = Arc::downgrade(&pg);
        pg
    }

    /// `initdb`, start, and create the `app` role, the `shop` database and
    /// its `customers` table. Panics with the server's log if any step fails.
    pub fn start() -> Postgres {
        crate::require_root();
        let bin = Path::new(PG_BIN);
        assert!(
            bin.join("initdb").exists(),
            "PostgreSQL 15 is not installed ({PG_BIN}/initdb missing); .ci/run installs Debian's postgresql"
        );
        let dir = tempfile::Builder::new()
            .prefix("keyward-pg")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let account = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the `postgres` account Debian's postgresql package creates is missing");
        let (uid, gid) = (account.uid.as_raw(), account.gid.as_raw());
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let pg = Postgres {
            port: free_port(),
            dir,
            uid,
            gid,
        };
        pg.as_pg(&pg.bin("initdb"))
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["--username=postgres", "--encoding=UTF8", "--locale=C"])
            .arg("-D")
            .arg(pg.data())
            .output_ok("initdb");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c max_connections=20 -c shared_buffers=16MB",
            pg.port,
            pg.dir.path().display()
        );
        let started = pg
            .as_pg(&pg.bin("pg_ctl"))
            .arg("-D")
            .arg(pg.data())
            .arg("-l")
            .arg(pg.log_path())
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "pg_ctl start failed: {}\n--- log\n{}",
            String::from_utf8_lossy(&started.stderr),
            pg.log()
        );
        pg.psql_as_superuser(
            "postgres",
            &format!(
                "SET password_encryption = 'scram-sha-256';\n\
                 CREATE ROLE app LOGIN PASSWORD '{SECRET}';\n\
                 CREATE DATABASE shop OWNER app;"
            ),
        );
        let mut setup = String::from(
            "SET ROLE app;\n\
             CREATE TABLE customers (id integer PRIMARY KEY, name text NOT NULL, \
             email text NOT NULL, active boolean NOT NULL DEFAULT true, \
             balance numeric(12,2) NOT NULL DEFAULT 0, score double precision, \
             visits bigint NOT NULL DEFAULT 0, tags text[]);\n",
        );
        for (id, name, email) in CUSTOMERS {
            setup.push_str(&format!(
                "INSERT INTO customers (id, name, email, balance, score, visits, tags) \
                 VALUES ({id}, '{name}', '{email}', {id}0.50, {id}.25, {id}000, ARRAY['t{id}']);\n"
            ));
        }
        pg.psql_as_superuser("shop", &setup);
        pg
    }

    /// A `postgresql://` URL for `app` on the TCP port, without a password.
    pub fn url(&self, database: &str) -> String {
        format!("postgresql://app@127.0.0.1:{}/{database}", self.port)
    }

    /// Run `sql` as the superuser over the Unix socket; returns psql's
    /// unaligned, tuples-only stdout. Panics if psql fails.
    pub fn psql_as_superuser(&self, database: &str, sql: &str) -> String {
        use std::io::Write as _;
        let mut child = Command::new(self.bin("psql"))
            .env_clear()
            .env("PGCONNECT_TIMEOUT", "10")
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", database])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Statements from stdin run one by one (`-c` would wrap them in one
        // transaction, where CREATE DATABASE cannot run).
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "psql failed: {}\n--- log\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `customers` rows now, as psql prints them (`id|name|email`
    /// lines, by id): what a test compares with [`Postgres::initial_rows`].
    pub fn customer_rows(&self) -> String {
        self.psql_as_superuser("shop", "SELECT id, name, email FROM customers ORDER BY id")
    }

    /// [`Postgres::customer_rows`] as the table started.
    pub fn initial_rows() -> String {
        CUSTOMERS
            .iter()
            .map(|(id, name, email)| format!("{id}|{name}|{email}\n"))
            .collect()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn bin(&self, name: &str) -> PathBuf {
        Path::new(PG_BIN).join(name)
    }

    /// `program` as the `postgres` account (std drops root's groups), clean
    /// environment, cwd in the temp dir.
    fn as_pg(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .uid(self.uid)
            .gid(self.gid);
        cmd
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .as_pg(&self.bin("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

trait OutputOk {
    fn output_ok(&mut self, what: &str) -> Output;
}

impl OutputOk for Command {
    fn output_ok(&mut self, what: &str) -> Output {
        let out = self.output().unwrap();
        assert!(
            out.status.success(),
            "{what} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_the_customers_table_and_stops_on_drop() {
        let pg = Postgres::start();
        assert_eq!(pg.customer_rows(), Postgres::initial_rows());
        let port = pg.port;
        drop(pg);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
