// SPDX-License-Identifier: Apache-2.0
//! Who besides its owner may read or write a file.
//!
//! Without an ACL the mode says it. With a POSIX access ACL the mode's
//! group bits are the ACL *mask*, and the grants are the ACL's entries: a
//! named user, the owning group, named groups, others. systemd gives a
//! service its credentials this way on recent versions (root-owned, with
//! an ACL entry for the service's user), so reading only the mode would
//! refuse a correctly protected directory, and could miss a grant made by
//! ACL alone.

use std::fs::{File, Metadata};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use crate::sys;

/// Permission bits of an ACL entry (and of each triple of a mode).
pub const READ: u32 = 4;
pub const WRITE: u32 = 2;
pub const EXECUTE: u32 = 1;

const ACL_VERSION: u32 = 2;
const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// The owner of a file, when it is neither this process's user nor root:
/// the fix for that is `chown`, not `chmod`.
pub fn foreign_owner(meta: &Metadata) -> Option<u32> {
    let me = nix::unistd::geteuid().as_raw();
    (meta.uid() != me && meta.uid() != 0).then_some(meta.uid())
}

/// What to tell the admin to run about a file `others_with_access`
/// refused: `chown` for a foreign owner, else `chmod MODE`.
pub fn remedy(meta: &Metadata, mode: &str) -> String {
    match foreign_owner(meta) {
        Some(_) => "chown it to root or to the broker's user".to_owned(),
        None => format!("chmod {mode} it"),
    }
}

/// If anyone but this process's user (and root) — any group included —
/// may access `file` with
/// any of the `forbidden` permission bits, say who and how, in words fit
/// for an error message. An unreadable or malformed ACL counts as access.
pub fn others_with_access(file: &File, meta: &Metadata, forbidden: u32) -> Option<String> {
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    if meta.uid() != me && meta.uid() != 0 {
        return Some(format!(
            "is owned by uid {}, not by the broker or root",
            meta.uid()
        ));
    }
    let acl = match sys::posix_acl(file.as_fd()) {
        Ok(acl) => acl,
        Err(e) => return Some(format!("has an ACL that cannot be read ({e})")),
    };
    let Some(acl) = acl else {
        let group = (mode >> 3) & 0o7;
        let other = mode & 0o7;
        let who = if other & forbidden != 0 {
            "anyone"
        } else if group & forbidden != 0 {
            "its group"
        } else {
            return None;
        };
        return Some(format!("is accessible to {who} (mode {mode:04o})"));
    };
    let entries = match parse_acl(&acl) {
        Some(entries) => entries,
        None => return Some("has an ACL that cannot be understood".to_owned()),
    };
    let mask = entries
        .iter()
        .find(|e| e.tag == ACL_MASK)
        .map_or(0o7, |e| e.perm);
    for entry in &entries {
        let (effective, who) = match entry.tag {
            ACL_USER if entry.id != me && entry.id != 0 => {
                (entry.perm & mask, format!("uid {}", entry.id))
            }
            ACL_GROUP_OBJ => (entry.perm & mask, format!("its group (gid {})", meta.gid())),
            ACL_GROUP => (entry.perm & mask, format!("gid {}", entry.id)),
            ACL_OTHER => (entry.perm, "anyone".to_owned()),
            _ => continue,
        };
        if effective & forbidden != 0 {
            return Some(format!(
                "has an ACL that lets {who} access it (mode {mode:04o}+)"
            ));
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u32,
    id: u32,
}

/// The kernel's `system.posix_acl_access` format: a little-endian u32
/// version, then 8-byte entries (u16 tag, u16 perm, u32 id).
fn parse_acl(bytes: &[u8]) -> Option<Vec<Entry>> {
    let (header, rest) = bytes.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*header) != ACL_VERSION || rest.len() % 8 != 0 {
        return None;
    }
    rest.chunks_exact(8)
        .map(|e| {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u32::from(u16::from_le_bytes([e[2], e[3]]));
            let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let known = [
                ACL_USER_OBJ,
                ACL_USER,
                ACL_GROUP_OBJ,
                ACL_GROUP,
                ACL_MASK,
                ACL_OTHER,
            ];
            known.contains(&tag).then_some(Entry { tag, perm, id })
        })
        .collect()
}

/// Encode entries in the kernel's format (tests set ACLs with it).
#[cfg(test)]
pub(crate) fn encode_acl(entries: &[(u16, u32, u32)]) -> Vec<u8> {
    let mut out = ACL_VERSION.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&(perm as u16).to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An entry's id field for the `*_OBJ`, mask and other entries.
    const UNDEFINED: u32 = u32::MAX;

    fn check(path: &std::path::Path, forbidden: u32) -> Option<String> {
        let file = File::open(path).unwrap();
        let meta = file.metadata().unwrap();
        others_with_access(&file, &meta, forbidden)
    }

    fn set_mode(path: &std::path::Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn mode_alone() {
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o700);
        assert_eq!(check(dir.path(), READ | WRITE), None);
        set_mode(dir.path(), 0o705);
        assert!(check(dir.path(), READ | WRITE).unwrap().contains("anyone"));
        set_mode(dir.path(), 0o711);
        assert_eq!(
            check(dir.path(), READ | WRITE),
            None,
            "search alone is fine"
        );
    }

    /// How recent systemd hands a service its credentials: the directory
    /// is root's, its mode shows the ACL mask in the group bits, and the
    /// ACL grants the service's uid. If this process is that uid, it is
    /// accepted; an ACL grant to another uid is refused.
    #[test]
    fn acl_grants_are_read_from_the_acl() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let grant = |uid: u32| {
            encode_acl(&[
                (ACL_USER_OBJ, 0o7, UNDEFINED),
                (ACL_USER, 0o5, uid),
                (ACL_GROUP_OBJ, 0, UNDEFINED),
                (ACL_MASK, 0o5, UNDEFINED),
                (ACL_OTHER, 0, UNDEFINED),
            ])
        };
        if sys::set_posix_acl(dir.path(), &grant(me)).is_err() {
            eprintln!("skipped: this file system has no POSIX ACLs");
            return;
        }
        let mode = std::fs::metadata(dir.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o750, "the mask shows as the group bits");
        assert_eq!(check(dir.path(), READ | WRITE), None);
        sys::set_posix_acl(dir.path(), &grant(4242)).unwrap();
        let refused = check(dir.path(), READ | WRITE).unwrap();
        assert!(refused.contains("uid 4242"), "{refused}");
    }

    #[test]
    fn malformed_acls_count_as_access() {
        assert_eq!(parse_acl(&[2, 0, 0, 0]), Some(vec![]));
        assert_eq!(parse_acl(&[3, 0, 0, 0]), None);
        assert_eq!(parse_acl(&[2, 0, 0, 0, 1]), None);
        assert_eq!(parse_acl(&encode_acl(&[(0x40, 7, 0)])), None);
    }
}
