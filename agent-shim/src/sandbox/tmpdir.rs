// SPDX-License-Identifier: Apache-2.0
//! Fallback mode's private temporary directory: without a mount namespace
//! there is no private tmpfs `/tmp`, so the shim creates a fresh `0700`
//! directory in its own temporary directory (`$TMPDIR`, else `/tmp`),
//! Landlock grants the program read and write there and nowhere else in
//! `/tmp`, `TMPDIR` points at it, and it is removed, whatever the program
//! left in it, once every process of the sandbox is gone: by the reaper
//! (which outlives a shim killed by `SIGKILL`), else by the shim.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The directory; removed on drop. Dropped only by the shim: the processes
/// it forks end in `exec` or `_exit`, and run no destructor.
#[derive(Debug)]
pub(super) struct PrivateTmp {
    path: PathBuf,
}

impl PrivateTmp {
    /// Create the directory, `0700`, with an unpredictable name.
    pub fn create() -> io::Result<PrivateTmp> {
        let dir = tempfile::Builder::new()
            .prefix("agent-shim-tmp-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        // Canonical: Landlock follows no link in a caller's path.
        let path = dir.keep();
        match std::fs::canonicalize(&path) {
            Ok(path) => Ok(PrivateTmp { path }),
            Err(e) => {
                let _ = std::fs::remove_dir(&path);
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateTmp {
    fn drop(&mut self) {
        remove(&self.path);
    }
}

/// Remove the directory (if the reaper has not already); a failure is
/// said on stderr.
pub(super) fn remove(path: &Path) {
    match remove_tree(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => eprintln!(
            "agent-shim: warning: cannot remove the sandbox's temporary directory {}: {e}",
            path.display()
        ),
        _ => {}
    }
}

/// Remove `dir` and everything in it, also what the program made
/// unreadable (`chmod 000` on a directory): every directory is given back
/// `0700` before it is read. Symbolic links are removed, never followed.
fn remove_tree(dir: &Path) -> io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            remove_tree(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    std::fs::remove_dir(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn is_private_and_removed_with_whatever_is_left_in_it() {
        let tmp = PrivateTmp::create().unwrap();
        let path = tmp.path().to_owned();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        let locked = path.join("a/b");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", path.join("link")).unwrap();
        std::fs::set_permissions(path.join("a"), std::fs::Permissions::from_mode(0o000)).unwrap();
        drop(tmp);
        assert!(!path.exists(), "{path:?}");
        assert!(Path::new("/etc/passwd").exists());
    }
}
