// SPDX-License-Identifier: Apache-2.0
//! Protocol versions, both ways (docs/PROTOCOL.md):
//!
//! - a client of version 2 (its `Hello` sent by hand) against this broker:
//!   served in version 2, its tool list in version 2's encoding (written
//!   here field by field as 81c7152 encoded it) and without the gateway
//!   version 2 did not have; a request appended since is refused
//!   naming both versions, and the connection goes on;
//! - a client too old, and one newer than the broker;
//! - this `agent-shim` against a stand-in broker of version 2 (which
//!   refuses any other `Hello` and cannot decode any request appended
//!   since): `tools` works; `token inspect` fails naming both versions
//!   instead of "malformed".
#![allow(clippy::unwrap_used, unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use keyward_proto::{
    decode, encode, ErrorCode, ErrorReply, Hello, Request, Response, ToolInfo, ToolKind,
    MAX_MESSAGE, PROTOCOL_VERSION,
};
use keyward_tests::{echo_request, shim_command, Broker, Ran, RawConn, PRINCIPAL_UID, SECRET};

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
credentials_dir = "{dir}/creds"

[[principal]]
name = "tester"
uids = [0, 61000]
may_call = ["echo", "models"]

[credential.api]
file = "api.token"

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }

[[gateway]]
name = "models"
upstream = "http://127.0.0.1:9"
credential = "api"
auth = { bearer = true }
allow = [ { method = "GET", path = "/v1/models" } ]
"#;

/// The next message's bytes.
fn recv_bytes(conn: &RawConn) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let n = nix::sys::socket::recv(
        conn.fd.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    buf.truncate(n);
    buf
}

/// Send `request`, read the reply's bytes.
fn exchange_bytes(conn: &RawConn, request: &Request) -> Vec<u8> {
    conn.send(&encode(request).unwrap()).unwrap();
    recv_bytes(conn)
}

/// Version 2 encoded every response but `ToolList` as version 3 does.
fn exchange_v2(conn: &RawConn, request: &Request) -> Response {
    let bytes = exchange_bytes(conn, request);
    match decode::<Response>(&bytes) {
        Ok(response) if !matches!(response, Response::ToolList(_)) => response,
        other => panic!("not a version-2 response ({other:?}): {bytes:?}"),
    }
}

/// A tool list as version 2 (81c7152) encoded it: variant 6, the count,
/// and per tool its name, description and parameters (no `kind`),
/// written here field by field with postcard's own encoding.
fn v2_tool_list(tools: &[&ToolInfo]) -> Vec<u8> {
    let mut bytes = vec![0x06, u8::try_from(tools.len()).unwrap()];
    for tool in tools {
        bytes.extend(encode(&tool.name).unwrap());
        bytes.extend(encode(&tool.description).unwrap());
        bytes.extend(encode(&tool.params).unwrap());
    }
    bytes
}

#[test]
fn a_version_2_client_is_served_in_version_2() {
    let broker = Broker::start(CONFIG, &[("api.token", SECRET)]);
    // What a current client is told: the tool and the gateway, marked.
    let current = RawConn::connect(&broker.socket);
    current.hello();
    let tools = match current.request(&Request::Tools) {
        Some(Response::ToolList(list)) => list.tools,
        other => panic!("{other:?}"),
    };
    let kinds: Vec<(&str, ToolKind)> = tools.iter().map(|t| (t.name.as_str(), t.kind)).collect();
    assert_eq!(
        kinds,
        [("echo", ToolKind::Tool), ("models", ToolKind::Gateway)]
    );

    let conn = RawConn::connect(&broker.socket);
    match exchange_v2(&conn, &Request::Hello(Hello { version: 2 })) {
        Response::Hello(h) => assert_eq!(h.version, 2),
        other => panic!("{other:?}"),
    }
    // The tool list in version 2's encoding: the tool, not the gateway.
    let listed = exchange_bytes(&conn, &Request::Tools);
    assert_eq!(listed, v2_tool_list(&[&tools[0]]));
    assert!(matches!(
        exchange_v2(&conn, &echo_request("v2")),
        Response::Done(_)
    ));
    // A request version 2 does not have: refused, naming both versions;
    // the connection goes on.
    match exchange_v2(&conn, &Request::Status) {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::VersionMismatch);
            assert!(
                e.message.contains("Status needs protocol version 3")
                    && e.message.contains("speaks version 2"),
                "{e:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        exchange_v2(&conn, &echo_request("still")),
        Response::Done(_)
    ));
}

#[test]
fn too_old_is_refused_and_newer_gets_this_version() {
    let broker = Broker::start(CONFIG, &[("api.token", SECRET)]);
    let conn = RawConn::connect(&broker.socket);
    match conn.request(&Request::Hello(Hello { version: 1 })) {
        Some(Response::Error(e)) => {
            assert_eq!(e.code, ErrorCode::VersionMismatch);
            assert!(
                e.message
                    .contains("protocol version 1 is not supported (broker speaks 2 to 3)"),
                "{e:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.recv().is_none(), "connection left open");
    let conn = RawConn::connect(&broker.socket);
    match conn.request(&Request::Hello(Hello {
        version: PROTOCOL_VERSION + 1,
    })) {
        Some(Response::Hello(h)) => assert_eq!(h.version, PROTOCOL_VERSION),
        other => panic!("{other:?}"),
    }
}

/// A stand-in for a version-2 broker on `path`, serving connections one
/// after another for as long as the test runs.
fn v2_broker(path: &Path) {
    use nix::sys::socket::{
        accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::FromRawFd;
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(listener.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&listener, Backlog::new(8).unwrap()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::thread::spawn(move || loop {
        let Ok(fd) = accept(listener.as_raw_fd()) else {
            return;
        };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        serve_v2(&conn);
    });
}

/// One connection as a version-2 broker serves it.
fn serve_v2(conn: &OwnedFd) {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let send = |response: &Response| {
        let _ = nix::unistd::write(conn, &encode(response).unwrap());
    };
    let error = |code, message: &str| {
        Response::Error(ErrorReply {
            code,
            message: message.into(),
        })
    };
    loop {
        let Ok(n) = nix::unistd::read(conn, &mut buf) else {
            return;
        };
        // Version 2 knew requests 0 to 7; anything after is an unknown
        // variant to it.
        match buf.get(..n) {
            None | Some([]) => return,
            Some([0x00, 0x02]) => send(&Response::Hello(Hello { version: 2 })),
            Some([0x00, v]) => {
                send(&error(
                    ErrorCode::VersionMismatch,
                    &format!("protocol version {v} is not supported (broker speaks 2)"),
                ));
                return;
            }
            // Tools: one tool "echo", in version 2's encoding.
            Some([0x06]) => {
                let _ = nix::unistd::write(conn, &[0x06, 0x01, 0x04, b'e', b'c', b'h', b'o', 0, 0]);
            }
            Some([tag, ..]) if *tag <= 7 => send(&error(ErrorCode::Internal, "not in this test")),
            Some(_) => {
                send(&error(
                    ErrorCode::Malformed,
                    "message has an unknown variant",
                ));
                return;
            }
        }
    }
}

#[test]
fn this_shim_against_a_version_2_broker() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("old.sock");
    v2_broker(&socket);
    let ran = Ran::from(
        shim_command(&socket, PRINCIPAL_UID, &["tools"])
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.starts_with("echo: "), "{ran:?}");

    let ran = Ran::from(
        shim_command(
            &socket,
            PRINCIPAL_UID,
            &["token", "inspect", "kw1.not-checked-before-the-version"],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.contains(
            "the broker speaks protocol version 2, and Inspect needs version 3 \
             (this client speaks 2 to 3): upgrade keyward-broker"
        ),
        "{ran:?}"
    );
    assert!(!ran.stderr.contains("malformed"), "{ran:?}");
}
