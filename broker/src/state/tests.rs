// SPDX-License-Identifier: Apache-2.0
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn id(n: u8) -> TokenId {
    TokenId([n; 16])
}

fn record(expires: u64, max_uses: Option<u32>) -> MintRecord {
    MintRecord {
        issuer: "o".into(),
        expires,
        max_uses,
        owner: 1000,
        attenuated: false,
        origin: Some(Origin {
            audience: Audience {
                uid: 1000,
                gid: None,
            },
            task: [7; 32],
            lineage: Vec::new(),
        }),
    }
}

/// An attenuation of the token whose record is `parent` (id `of`).
fn child(parent: &MintRecord, of: TokenId) -> MintRecord {
    let mut child = parent.clone();
    child.attenuated = true;
    if let Some(origin) = &mut child.origin {
        origin.lineage.push(of);
    }
    child
}

fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

const LIMITS: Limits = Limits {
    live_per_uid: 100,
    attenuations_per_uid: 10,
};

#[test]
fn survives_reopen() {
    let dir = private_dir();
    let state = TokenState::open(dir.path()).unwrap();
    let r = record(2000, Some(1));
    state.record_mint(id(1), r.clone(), LIMITS, 1000).unwrap();
    state.revoke(id(2), 1000).unwrap();
    state.consume(&[(id(1), 1)], 1000).unwrap();
    drop(state);
    let state = TokenState::open(dir.path()).unwrap();
    assert_eq!(state.minted(&id(1)), Some(r));
    assert_eq!(state.revoked_among([&id(3), &id(2)]), Some(id(2)));
    assert!(matches!(
        state.consume(&[(id(1), 1)], 1000),
        Err(UseError::Exhausted(_))
    ));
    assert_eq!(state.uses(&id(1)), 1);
}

#[test]
fn consume_is_all_or_nothing() {
    let dir = private_dir();
    let state = TokenState::open(dir.path()).unwrap();
    state.consume(&[(id(1), 1)], 0).unwrap();
    assert!(state.consume(&[(id(2), 5), (id(1), 1)], 0).is_err());
    assert_eq!(state.uses(&id(2)), 0, "no partial charge");
}

#[test]
fn concurrent_uses_are_each_counted_once() {
    let dir = private_dir();
    let state = std::sync::Arc::new(TokenState::open(dir.path()).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let state = std::sync::Arc::clone(&state);
            std::thread::spawn(move || {
                (0..50)
                    .filter(|_| state.consume(&[(id(7), 300)], 0).is_ok())
                    .count()
            })
        })
        .collect();
    let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(ok, 300, "exactly max_uses calls went ahead");
    drop(state);
    let state = TokenState::open(dir.path()).unwrap();
    assert_eq!(state.uses(&id(7)), 300);
}

/// Two revocations logged, then `mask` xored into the byte `offset` into
/// the first one's frame: the reopen must fail as corrupt.
fn assert_damage_is_corruption(offset: usize, mask: u8) {
    let dir = private_dir();
    let state = TokenState::open(dir.path()).unwrap();
    state.revoke(id(1), 0).unwrap();
    state.revoke(id(2), 0).unwrap();
    drop(state);
    let path = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let header = log::frame(&[Record::Format(log::FORMAT_VERSION)]).len();
    bytes[header + offset] ^= mask;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        TokenState::open(dir.path()),
        Err(StateError::Corrupt { .. })
    ));
}

#[test]
fn corrupt_state_is_an_error() {
    // Flip a byte inside the first revocation's frame: damage with whole
    // frames after it is corruption, not a torn tail.
    assert_damage_is_corruption(14, 0xff);
}

#[test]
fn a_damaged_length_is_corruption_not_a_torn_tail() {
    // A length grown past the end of the file would read as a frame cut
    // short, and the revocations after it would be dropped in silence.
    assert_damage_is_corruption(2, 0x01);
}

#[test]
fn a_torn_last_frame_is_cut_off() {
    let dir = private_dir();
    let state = TokenState::open(dir.path()).unwrap();
    state.revoke(id(1), 0).unwrap();
    drop(state);
    let path = dir.path().join(LOG_FILE);
    let whole = std::fs::metadata(&path).unwrap().len();
    let torn = log::frame(&[Record::Revoke(id(2), 9)]);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(&torn[..torn.len() - 3]).unwrap();
    drop(file);
    let state = TokenState::open(dir.path()).unwrap();
    assert_eq!(state.revoked_among([&id(1)]), Some(id(1)));
    assert_eq!(state.revoked_among([&id(2)]), None, "never acknowledged");
    state.revoke(id(3), 0).unwrap();
    drop(state);
    assert!(std::fs::metadata(&path).unwrap().len() > whole);
    let state = TokenState::open(dir.path()).unwrap();
    assert_eq!(state.revoked_among([&id(3)]), Some(id(3)));
}

#[test]
fn a_clock_stepped_back_does_not_revive_pruned_tokens() {
    let dir = private_dir();
    let state = TokenState::open(dir.path()).unwrap();
    state.revoke(id(1), 4_000_000_000).unwrap();
    drop(state);
    let state = TokenState::open(dir.path()).unwrap();
    assert_eq!(state.clock(5_000), 4_000_000_000);
    assert_eq!(state.clock(4_000_000_001), 4_000_000_001);
}

#[test]
fn expired_entries_are_pruned_from_memory_and_disk() {
    let dir = private_dir();
    let state = TokenState::open(dir.path()).unwrap();
    state
        .record_mint(id(1), record(100, None), LIMITS, 50)
        .unwrap();
    state.revoke(id(1), 50).unwrap();
    state.revoke(id(9), 50).unwrap();
    // A minute past the grace: the next mint prunes.
    state
        .record_mint(id(2), record(10_000, None), LIMITS, 1000)
        .unwrap();
    assert_eq!(state.minted(&id(1)), None);
    assert_eq!(state.revoked_among([&id(1)]), None);
    assert_eq!(
        state.revoked_among([&id(9)]),
        Some(id(9)),
        "unknown expiry kept"
    );
    let snapshot = state.shared.snapshot(1000);
    assert!(!snapshot
        .iter()
        .any(|r| matches!(r, Record::Mint(i, _) | Record::Revoke(i, _) if *i == id(1))));
}

#[test]
fn compaction_keeps_the_live_state_and_bounds_the_log() {
    let dir = private_dir();
    let state = TokenState::open(dir.path()).unwrap();
    let limits = Limits {
        live_per_uid: 1_000_000,
        attenuations_per_uid: 1,
    };
    state
        .record_mint(id(1), record(4_000_000_000, Some(3)), limits, 50)
        .unwrap();
    state.consume(&[(id(1), 3)], 50).unwrap();
    state.revoke(id(2), 50).unwrap();
    // Tokens long expired by the wall clock the writer prunes with.
    let n = 600u32;
    for i in 0..n {
        let mut tid = [0xa0u8; 16];
        tid[..4].copy_from_slice(&i.to_le_bytes());
        state
            .record_mint(TokenId(tid), record(100, Some(3)), limits, 50)
            .unwrap();
    }
    let size = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
    let one = log::frame(&[Record::Mint(id(3), record(100, Some(3))), Record::Clock(50)]).len();
    assert!(
        size < (n as u64) * (one as u64) / 2,
        "{size} bytes for {n} mints of {one} bytes each: not compacted"
    );
    drop(state);
    let state = TokenState::open(dir.path()).unwrap();
    assert_eq!(state.minted(&id(1)).map(|m| m.max_uses), Some(Some(3)));
    assert_eq!(state.uses(&id(1)), 1);
    assert_eq!(state.revoked_among([&id(2)]), Some(id(2)));
}

#[test]
fn caps_per_uid() {
    let dir = private_dir();
    let state = TokenState::open(dir.path()).unwrap();
    let limits = Limits {
        live_per_uid: 3,
        attenuations_per_uid: 1,
    };
    let child = MintRecord {
        attenuated: true,
        ..record(500, None)
    };
    state
        .record_mint(id(1), record(500, None), limits, 10)
        .unwrap();
    state.record_mint(id(2), child.clone(), limits, 10).unwrap();
    let e = state.record_mint(id(3), child, limits, 10).unwrap_err();
    assert!(
        matches!(
            e,
            StateError::AttenuationCap {
                uid: 1000,
                limit: 1
            }
        ),
        "{e}"
    );
    state
        .record_mint(id(4), record(500, None), limits, 10)
        .unwrap();
    let e = state
        .record_mint(id(5), record(500, None), limits, 10)
        .unwrap_err();
    assert!(
        matches!(
            e,
            StateError::LiveCap {
                uid: 1000,
                limit: 3
            }
        ),
        "{e}"
    );
    let other = MintRecord {
        owner: 1001,
        ..record(500, None)
    };
    state.record_mint(id(6), other, limits, 10).unwrap();
    // Expired ones no longer count.
    state
        .record_mint(id(5), record(5000, None), limits, 600)
        .unwrap();
}

#[test]
fn an_old_tokens_json_is_imported_once() {
    let dir = private_dir();
    let hex = |n: u8| id(n).to_string();
    let old = serde_json::json!({
        "version": 1,
        "revoked": { hex(1): 4_000_000_000u64 },
        "uses": { hex(2): 3 },
        "minted": { hex(2): { "issuer": "ops", "expires": 4_000_000_000u64, "max_uses": 3 } },
        "high_water": 1234,
    });
    let path = dir.path().join(LEGACY_FILE);
    std::fs::write(&path, old.to_string()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = TokenState::open(dir.path()).unwrap();
    assert!(!path.exists(), "removed once imported");
    drop(state);
    let state = TokenState::open(dir.path()).unwrap();
    assert_eq!(state.revoked_among([&id(1)]), Some(id(1)));
    assert!(matches!(
        state.consume(&[(id(2), 3)], 0),
        Err(UseError::Exhausted(_))
    ));
    assert_eq!(state.minted(&id(2)).unwrap().issuer, "ops");
}

#[test]
fn a_directory_or_file_others_may_write_is_refused() {
    let dir = private_dir();
    drop(TokenState::open(dir.path()).unwrap());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = TokenState::open(dir.path()).unwrap_err();
    assert!(matches!(e, StateError::Access { .. }), "{e}");
    assert!(e.to_string().contains("accessible to anyone"), "{e}");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let log = dir.path().join(LOG_FILE);
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o620)).unwrap();
    let e = TokenState::open(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tokens.log"), "{e}");
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("x")).unwrap();
    let e = TokenState::open(dir.path()).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
}

/// Open `bytes` as the log of a fresh state directory: the result, and
/// whether the file is still exactly `bytes`.
fn open_log_of(bytes: &[u8]) -> (Result<TokenState, StateError>, bool) {
    let dir = private_dir();
    let path = dir.path().join(LOG_FILE);
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let opened = TokenState::open(dir.path());
    let unchanged = std::fs::read(&path).unwrap() == bytes;
    (opened, unchanged)
}

#[test]
fn a_log_of_an_unknown_version_is_refused_and_left_as_it_is() {
    // A newer broker's log, its last frame torn: cutting that frame off
    // (as a valid log's would be) is not this broker's to do.
    let mut newer = log::frame(&[Record::Format(99)]);
    newer.extend(log::frame(&[Record::Revoke(id(1), 9)]));
    let torn = log::frame(&[Record::Revoke(id(2), 9)]);
    newer.extend(&torn[..torn.len() - 3]);
    let (opened, unchanged) = open_log_of(&newer);
    let e = opened.unwrap_err();
    assert!(matches!(e, StateError::Version { version: 99, .. }), "{e}");
    let message = e.to_string();
    assert!(message.contains("tokens.log"), "{message}");
    assert!(message.contains("version 99"), "{message}");
    assert!(
        message.contains("move it out of the state directory"),
        "{message}"
    );
    assert!(unchanged, "the file was changed");

    // Its header carries records this broker cannot decode.
    let mut payload = postcard::to_allocvec(&Record::Format(7)).unwrap();
    payload.extend([0x63, 1, 2, 3]);
    let len = (payload.len() as u32).to_le_bytes();
    let mut newer = len.to_vec();
    newer.extend(&blake3::hash(&len).as_bytes()[..4]);
    newer.extend(&blake3::hash(&payload).as_bytes()[..8]);
    newer.extend(&payload);
    newer.extend([0xaa; 10]);
    let (opened, unchanged) = open_log_of(&newer);
    let e = opened.unwrap_err();
    assert!(matches!(e, StateError::Version { version: 7, .. }), "{e}");
    assert!(unchanged, "the file was changed");
}

#[test]
fn a_file_that_is_not_a_log_is_refused_and_left_as_it_is() {
    for bytes in [
        b"# not a token log\n".to_vec(),
        // Zeros (a file whose data never reached the disk, or anyone's):
        // read as a torn tail, this was cut to nothing and replaced by an
        // empty log, forgetting every revocation.
        vec![0u8; 4096],
        // A frame of ours that is not a format header.
        log::frame(&[Record::Revoke(id(1), 9)]),
    ] {
        let (opened, unchanged) = open_log_of(&bytes);
        let e = opened.unwrap_err();
        assert!(matches!(e, StateError::NotALog { .. }), "{e}");
        let message = e.to_string();
        assert!(
            message.contains("tokens.log is not a keyward token log"),
            "{message}"
        );
        assert!(message.contains("left as it is"), "{message}");
        assert!(unchanged, "the file was changed: {message}");
    }
}

#[test]
fn a_header_cut_short_is_a_new_log() {
    let header = log::frame(&[Record::Format(log::FORMAT_V2)]);
    let (opened, _) = open_log_of(&header[..5]);
    let state = opened.unwrap();
    state.revoke(id(1), 0).unwrap();
}

#[test]
fn a_torn_tail_of_a_valid_log_is_cut_only_after_its_header_is_checked() {
    let mut bytes = log::frame(&[Record::Format(log::FORMAT_VERSION)]);
    bytes.extend(log::frame(&[Record::Revoke(id(1), 9)]));
    let whole = bytes.len();
    let torn = log::frame(&[Record::Revoke(id(2), 9)]);
    bytes.extend(&torn[..torn.len() - 1]);
    let dir = private_dir();
    let path = dir.path().join(LOG_FILE);
    std::fs::write(&path, &bytes).unwrap();
    let opened = Log::open(dir.path()).unwrap();
    assert_eq!(opened.version, log::FORMAT_VERSION);
    assert_eq!(opened.records, vec![Record::Revoke(id(1), 9)]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), whole as u64);
}

/// A log as the broker before format 3 wrote it (main at a5741ea):
/// tokens 1 (owner 1000, 5 uses) and 2 (its child, owner 1001, 2 uses),
/// one use of each, and token 3 revoked.
const FORMAT_2_LOG: &str = "02000000f03bf86f0013f4c84c09ed4f000225000000926c4e01af60c25c3b6a837a0101010101010101010101010101010101036f707380d0acf30e0105e807000480e2cfaa0625000000926c4e01918436f7c09adf080102020202020202020202020202020202036f707380d0acf30e0102e907010480e2cfaa062a00000095dbc3246a2c6234f68691840202020202020202020202020202020202020101010101010101010101010101010101010480e2cfaa0621000000e4f9cf3a2b1f87c56256523e0303030303030303030303030303030303ffffffffffffffffff010480e2cfaa06";

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_format_2_log_opens_and_is_rewritten_in_format_3() {
    let dir = private_dir();
    let path = dir.path().join(LOG_FILE);
    std::fs::write(&path, unhex(FORMAT_2_LOG)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let check = |state: &TokenState| {
        let parent = state.minted(&id(1)).unwrap();
        assert_eq!(
            (parent.issuer.as_str(), parent.owner, parent.max_uses),
            ("ops", 1000, Some(5))
        );
        assert_eq!(parent.origin, None, "format 2 did not record it");
        let child = state.minted(&id(2)).unwrap();
        assert!(child.attenuated);
        assert_eq!((state.uses(&id(1)), state.uses(&id(2))), (1, 1));
        assert_eq!(state.revoked_among([&id(3)]), Some(id(3)));
    };
    let state = TokenState::open(dir.path()).unwrap();
    check(&state);
    let r = record(4_000_000_000, None);
    state
        .record_mint(id(4), r.clone(), LIMITS, 1_700_000_000)
        .unwrap();
    drop(state);
    let opened = Log::open(dir.path()).unwrap();
    assert_eq!(opened.version, log::FORMAT_VERSION, "migrated");
    drop(opened);
    let state = TokenState::open(dir.path()).unwrap();
    check(&state);
    assert_eq!(state.minted(&id(4)), Some(r));
}

#[test]
fn origin_survives_reopen_and_compaction() {
    let dir = private_dir();
    let state = TokenState::open(dir.path()).unwrap();
    let root = record(4_000_000_000, None);
    let kid = child(&root, id(1));
    state.record_mint(id(1), root, LIMITS, 50).unwrap();
    state.record_mint(id(2), kid.clone(), LIMITS, 50).unwrap();
    drop(state);
    let state = TokenState::open(dir.path()).unwrap();
    assert_eq!(state.minted(&id(2)), Some(kid.clone()));
    // Compacted: written from the snapshot.
    let snapshot = state.shared.snapshot(50);
    drop(state);
    let mut log = Log::open(dir.path()).unwrap().log;
    log.rewrite(&snapshot).unwrap();
    drop(log);
    let state = TokenState::open(dir.path()).unwrap();
    assert_eq!(state.minted(&id(2)), Some(kid));
}

/// Whether `uid` may record one more plain token under `limits` now.
fn may_mint(state: &TokenState, n: u8, limits: Limits) -> Result<(), StateError> {
    state.record_mint(id(n), record(5_000, None), limits, 10)
}

#[test]
fn a_revoked_token_frees_its_slot_and_its_descendants_slots() {
    let dir = private_dir();
    let limits = Limits {
        live_per_uid: 3,
        attenuations_per_uid: 2,
    };
    let state = TokenState::open(dir.path()).unwrap();
    let root = record(5_000, None);
    let kid = child(&root, id(1));
    let grandkid = child(&kid, id(2));
    state.record_mint(id(1), root, limits, 10).unwrap();
    state.record_mint(id(2), kid, limits, 10).unwrap();
    state.record_mint(id(3), grandkid, limits, 10).unwrap();
    assert!(matches!(
        may_mint(&state, 4, limits),
        Err(StateError::LiveCap { .. })
    ));
    // The child goes, and with it the grandchild: two slots.
    state.revoke(id(2), 10).unwrap();
    may_mint(&state, 4, limits).unwrap();
    may_mint(&state, 5, limits).unwrap();
    // The cap still holds for live tokens (1, 4, 5).
    assert!(matches!(
        may_mint(&state, 6, limits),
        Err(StateError::LiveCap { .. })
    ));
    // The same after a restart.
    drop(state);
    let state = TokenState::open(dir.path()).unwrap();
    assert!(matches!(
        may_mint(&state, 6, limits),
        Err(StateError::LiveCap { .. })
    ));
    state.revoke(id(4), 10).unwrap();
    may_mint(&state, 6, limits).unwrap();
    // A revoked token's records stay until it expires.
    assert!(state.minted(&id(2)).is_some());
}

#[test]
fn a_used_up_token_frees_its_slot() {
    let dir = private_dir();
    let limits = Limits {
        live_per_uid: 2,
        attenuations_per_uid: 2,
    };
    let state = TokenState::open(dir.path()).unwrap();
    let once = record(5_000, Some(1));
    let kid = child(&once, id(1));
    state.record_mint(id(1), once, limits, 10).unwrap();
    state.record_mint(id(2), kid, limits, 10).unwrap();
    assert!(matches!(
        may_mint(&state, 3, limits),
        Err(StateError::LiveCap { .. })
    ));
    // The child's use spends the parent's only one: both are done.
    state.consume(&[(id(1), 1)], 10).unwrap();
    may_mint(&state, 3, limits).unwrap();
    may_mint(&state, 4, limits).unwrap();
    assert!(matches!(
        may_mint(&state, 5, limits),
        Err(StateError::LiveCap { .. })
    ));
    drop(state);
    let state = TokenState::open(dir.path()).unwrap();
    assert!(matches!(
        may_mint(&state, 5, limits),
        Err(StateError::LiveCap { .. })
    ));
    // The used-up parent still stops its child.
    assert!(matches!(
        state.consume(&[(id(1), 1)], 10),
        Err(UseError::Exhausted(_))
    ));
}

#[test]
fn spent_tokens_kept_until_they_expire_are_bounded_too() {
    let dir = private_dir();
    let limits = Limits {
        live_per_uid: 2,
        attenuations_per_uid: 1,
    };
    let state = TokenState::open(dir.path()).unwrap();
    let root = record(5_000, None);
    state.record_mint(id(1), root.clone(), limits, 10).unwrap();
    // A one-use child, used, and again: each frees its slot at once, but
    // its record stays until it expires.
    let mut n = 2u8;
    let refused = loop {
        let mut kid = child(&root, id(1));
        kid.max_uses = Some(1);
        match state.record_mint(id(n), kid, limits, 10) {
            Ok(()) => state.consume(&[(id(n), 1)], 10).unwrap(),
            Err(e) => break e,
        }
        n += 1;
        assert!(n < 50, "no bound");
    };
    assert_eq!(n - 2, 4, "{refused}");
    assert!(
        matches!(refused, StateError::SpentCap { count: 4, .. }),
        "{refused}"
    );
    assert!(refused
        .to_string()
        .contains("has 4 revoked or used-up attenuated tokens that have not expired yet"));
    // Mint and revoke, in a loop: the same for plain tokens.
    let mut minted = 0;
    let refused = loop {
        match may_mint(&state, 100 + minted, limits) {
            Ok(()) => state.revoke(id(100 + minted), 10).unwrap(),
            Err(e) => break e,
        }
        minted += 1;
        assert!(minted < 50, "no bound");
    };
    // 4 spent children and 4 spent plain tokens: 8 = 4 x 2.
    assert_eq!(minted, 4, "{refused}");
    assert!(
        matches!(refused, StateError::SpentCap { count: 8, .. }),
        "{refused}"
    );
    // Forgotten once expired: room again.
    state
        .record_mint(id(200), record(9_000, None), limits, 5_000 + GRACE)
        .unwrap();
}

#[test]
fn a_damaged_header_of_a_known_version_is_corruption() {
    let mut payload = postcard::to_allocvec(&Record::Format(log::FORMAT_VERSION)).unwrap();
    payload.extend([0x63, 1, 2, 3]);
    let len = (payload.len() as u32).to_le_bytes();
    let mut bytes = len.to_vec();
    bytes.extend(&blake3::hash(&len).as_bytes()[..4]);
    bytes.extend(&blake3::hash(&payload).as_bytes()[..8]);
    bytes.extend(&payload);
    let (opened, unchanged) = open_log_of(&bytes);
    let e = opened.unwrap_err();
    assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
    assert!(unchanged);
}
