// SPDX-License-Identifier: Apache-2.0
//! The state directory and every file in it must be the broker's alone,
//! judged as the credentials directory is (owner, mode, POSIX ACL): if
//! another uid could replace `tokens.log`, it could reset use counts and
//! lift revocations at the next start.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::access;

use super::StateError;

/// Refuse a state directory, or any entry in it, that anyone but the
/// broker's uid and root owns, or that another uid or group may read or
/// write; refuse symbolic links inside it.
pub fn check(dir: &Path) -> Result<(), StateError> {
    let bad = |path: &Path, who: String| StateError::Access {
        path: path.to_owned(),
        who,
    };
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StateError::Io { path, source }
    };
    let handle = File::open(dir).map_err(io(dir))?;
    let meta = handle.metadata().map_err(io(dir))?;
    if !meta.is_dir() {
        return Err(bad(dir, "is not a directory".into()));
    }
    let forbidden = access::READ | access::WRITE;
    if let Some(who) = access::others_with_access(&handle, &meta, forbidden) {
        return Err(bad(dir, who));
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ELOOP) => bad(&path, "is a symbolic link".into()),
                _ => io(&path)(source),
            })?;
        let meta = file.metadata().map_err(io(&path))?;
        if let Some(who) = access::others_with_access(&file, &meta, forbidden) {
            return Err(bad(&path, who));
        }
    }
    Ok(())
}
