// SPDX-License-Identifier: Apache-2.0
//! The sandbox's root, built by the init in its new mount namespace: a
//! tmpfs holding read-only binds of the system directories and `/etc`
//! files the Landlock rules name, the `--allow-read` and `--allow-exec`
//! paths read-only, the `--allow-write` paths read-write, the program
//! itself read-only, a private tmpfs `/tmp`, a fresh `/proc` for the new
//! pid namespace and a minimal `/dev`. Nothing else of the host (no
//! `/home`, no `/run`) exists inside. Every bind is `nosuid` and `nodev`.
//!
//! The recipe, as bubblewrap's: make every mount a slave (nothing
//! propagates out); pivot into a scratch tmpfs so that the old root is
//! visible whole at `/oldroot`; build `/newroot` from it; detach the old
//! root; pivot into `/newroot`; make `/` read-only.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, pivot_root};

use super::plan::Plan;
use crate::sys;

/// `MOUNT_ATTR_*` of `mount_setattr(2)`.
const RDONLY: u64 = 0x1;
const NOSUID: u64 = 0x2;
const NODEV: u64 = 0x4;
const NOEXEC: u64 = 0x8;

/// The devices of the minimal `/dev` (bound from the host's).
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// A mount step that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {}: {source}", path.display())]
pub struct MountError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn step<T>(
    what: &'static str,
    path: impl AsRef<Path>,
    result: Result<T, impl Into<io::Error>>,
) -> Result<T, MountError> {
    result.map_err(|e| MountError {
        what,
        path: path.as_ref().to_owned(),
        source: e.into(),
    })
}

/// Build the root and enter it (see the module documentation).
pub(super) fn build_root(plan: &Plan) -> Result<(), MountError> {
    let none = None::<&str>;
    step(
        "make private",
        "/",
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none),
    )?;
    // A scratch root, so that the old one stays whole at /oldroot.
    tmpfs("/tmp", "mode=0755")?;
    step("enter", "/tmp", chdir("/tmp"))?;
    for dir in ["newroot", "oldroot"] {
        step("create", dir, std::fs::create_dir(dir))?;
    }
    step("pivot into", "/tmp", pivot_root(".", "oldroot"))?;
    step("enter", "/", chdir("/"))?;

    tmpfs("/newroot", "mode=0755")?;
    for dir in ["tmp", "proc", "dev"] {
        step(
            "create",
            dir,
            std::fs::create_dir(Path::new("/newroot").join(dir)),
        )?;
    }
    tmpfs("/newroot/tmp", "mode=1777")?;
    step(
        "mount proc on",
        "/newroot/proc",
        mount(
            Some("proc"),
            "/newroot/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            none,
        ),
    )?;
    build_dev()?;

    // System directories and the caller's paths, shallowest first, so that
    // a deeper bind lands on top of the one that contains it.
    let mut binds: Vec<(&Path, bool)> = Vec::new();
    let rules = &plan.mounts;
    binds.extend(rules.read_exec.iter().map(|p| (p.as_path(), false)));
    binds.extend(rules.read.iter().map(|p| (p.as_path(), false)));
    binds.extend(rules.read_write.iter().map(|p| (p.as_path(), true)));
    binds.retain(|(p, _)| !p.starts_with("/proc") && !p.starts_with("/dev") && p.is_absolute());
    binds.sort_by_key(|(p, _)| p.components().count());
    for (path, writable) in binds {
        bind(path, writable)?;
    }

    step(
        "detach",
        "/oldroot",
        umount2("/oldroot", MntFlags::MNT_DETACH),
    )?;
    step("enter", "/newroot", chdir("/newroot"))?;
    step("pivot into", "/newroot", pivot_root(".", "."))?;
    step(
        "detach",
        "the scratch root",
        umount2(".", MntFlags::MNT_DETACH),
    )?;
    step("enter", "/", chdir("/"))?;
    step(
        "make read-only",
        "/",
        sys::mount_setattr(Path::new("/"), RDONLY | NOSUID | NODEV, false),
    )?;
    // The working directory, where it exists inside.
    if chdir(&plan.cwd).is_err() {
        step("enter", "/", chdir("/"))?;
    }
    Ok(())
}

fn tmpfs(target: &str, options: &str) -> Result<(), MountError> {
    step(
        "mount a tmpfs on",
        target,
        mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options),
        ),
    )
}

/// A tmpfs `/dev` with [`DEVICES`] bound from the host's, `/dev/shm`, and
/// the usual links into `/proc/self/fd`.
fn build_dev() -> Result<(), MountError> {
    step(
        "mount a tmpfs on",
        "/newroot/dev",
        mount(
            Some("tmpfs"),
            "/newroot/dev",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0755"),
        ),
    )?;
    for name in DEVICES {
        let source = Path::new("/oldroot/dev").join(name);
        if !source.exists() {
            continue;
        }
        let target = Path::new("/newroot/dev").join(name);
        step("create", &target, std::fs::File::create(&target))?;
        step(
            "bind",
            &target,
            mount(
                Some(&source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
        )?;
        // Not nodev: these are the devices.
        step(
            "restrict",
            &target,
            sys::mount_setattr(&target, NOSUID | NOEXEC, false),
        )?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let target = Path::new("/newroot/dev").join(link);
        step("link", &target, std::os::unix::fs::symlink(to, &target))?;
    }
    step(
        "create",
        "/newroot/dev/shm",
        std::fs::create_dir("/newroot/dev/shm"),
    )?;
    tmpfs("/newroot/dev/shm", "mode=1777")
}

/// Show the host's `path` at the same place inside, read-only unless
/// `writable`. A symbolic link is copied as a link; a path that does not
/// exist is left out.
fn bind(path: &Path, writable: bool) -> Result<(), MountError> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    let source = Path::new("/oldroot").join(relative);
    let target = Path::new("/newroot").join(relative);
    let Ok(meta) = std::fs::symlink_metadata(&source) else {
        return Ok(());
    };
    if let Some(parent) = target.parent() {
        step("create", parent, std::fs::create_dir_all(parent))?;
    }
    if meta.file_type().is_symlink() {
        let to = step("read the link", &source, std::fs::read_link(&source))?;
        if std::fs::symlink_metadata(&target).is_err() {
            step("link", &target, std::os::unix::fs::symlink(to, &target))?;
        }
        return Ok(());
    }
    if meta.is_dir() {
        step("create", &target, std::fs::create_dir_all(&target))?;
    } else if std::fs::symlink_metadata(&target).is_err() {
        step("create", &target, std::fs::File::create(&target))?;
    }
    step(
        "bind",
        &target,
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    let attrs = NOSUID | NODEV | if writable { 0 } else { RDONLY };
    step(
        "restrict",
        &target,
        sys::mount_setattr(&target, attrs, true),
    )
}
