// SPDX-License-Identifier: Apache-2.0
//! The sandbox's root, built by the init in its new mount namespace: a
//! tmpfs holding read-only binds of the system directories and `/etc`
//! files the Landlock rules name, the `--allow-read` and `--allow-exec`
//! paths read-only, the `--allow-write` paths read-write, the program
//! itself read-only, a private tmpfs `/tmp`, a fresh `/proc` for the new
//! pid namespace and a minimal `/dev`. Nothing else of the host (no
//! `/home`, no `/run`) exists inside. Every bind is `nosuid` and `nodev`.
//!
//! `/etc/passwd` and `/etc/group` are generated (root, the caller,
//! nobody); `/dev/tty` is there only with `--tty`.
//!
//! The recipe, as bubblewrap's: resolve every path against the host's root
//! while it is still `/` (so an absolute symbolic link means what it meant
//! to the caller); make every mount a slave (nothing propagates out); pivot
//! into a scratch tmpfs so that the old root is visible whole at
//! `/oldroot`; build `/newroot` from it, each bind through descriptors
//! opened without following any link; detach the old root; pivot into
//! `/newroot`; make `/` read-only.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, pivot_root};

use super::plan::Plan;
use crate::landlock;
use crate::sys;

/// `MOUNT_ATTR_*` of `mount_setattr(2)`.
const RDONLY: u64 = 0x1;
const NOSUID: u64 = 0x2;
const NODEV: u64 = 0x4;
const NOEXEC: u64 = 0x8;

/// The devices of the minimal `/dev` (bound from the host's).
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

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
    // Resolved while "/" is still the host's: an absolute symbolic link
    // means the same here as it meant to the caller.
    let binds = resolve_binds(plan)?;
    let none = None::<&str>;
    step(
        "make private",
        "/",
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none),
    )?;
    // A scratch root, so that the old one stays whole at /oldroot.
    tmpfs("/tmp", "mode=0755")?;
    step("enter", "/tmp", chdir("/tmp"))?;
    for dir in ["newroot", "oldroot", "generated"] {
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
    build_dev(plan.tty)?;

    let oldroot = open_dir("/oldroot")?;
    let newroot = open_dir("/newroot")?;
    for b in &binds {
        bind(&oldroot, &newroot, b)?;
    }
    // The generated files last, on top of whatever holds their place (a
    // caller's `--allow-read /etc`).
    let scratch = open_dir("/generated")?;
    for (i, (path, content)) in plan.generated.iter().enumerate() {
        let file = Path::new("/generated").join(i.to_string());
        step("write", &file, std::fs::write(&file, content))?;
        let generated = Bind {
            inside: path.strip_prefix("/").unwrap_or(path).to_owned(),
            source: PathBuf::from(i.to_string()),
            writable: false,
        };
        bind(&scratch, &newroot, &generated)?;
    }
    drop((oldroot, newroot, scratch));

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

/// One bind: the host's `source` shown at `inside`, neither holding a
/// symbolic link (both relative to the root they are opened from).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bind {
    inside: PathBuf,
    source: PathBuf,
    writable: bool,
}

/// The binds of the root, shallowest first (a deeper bind lands on top
/// of the one that contains it), resolved against the host's root.
///
/// A caller's path was made canonical by the shim: if it no longer is (a
/// component was replaced by a symbolic link since), it is refused, as
/// what it now points at is not what the caller allowed. A system path
/// may be a link the administrator made (`/lib` -> `usr/lib`,
/// `/etc/resolv.conf` -> `/run/...`, an `/etc` of links as on NixOS):
/// what it points at is shown at its place. A system path that cannot be
/// resolved is left out; a caller's path that no longer can is refused.
fn resolve_binds(plan: &Plan) -> Result<Vec<Bind>, MountError> {
    let rules = &plan.mounts;
    let mut paths: Vec<(&Path, bool)> = Vec::new();
    paths.extend(rules.read_exec.iter().map(|p| (p.as_path(), false)));
    paths.extend(rules.read.iter().map(|p| (p.as_path(), false)));
    paths.extend(rules.read_write.iter().map(|p| (p.as_path(), true)));
    let generated = |p: &Path| plan.generated.iter().any(|(g, _)| g == p);
    let mut binds = Vec::new();
    for (path, writable) in paths {
        if !path.is_absolute() || generated(path) {
            continue;
        }
        let system = landlock::is_system_path(path);
        let source = match std::fs::canonicalize(path) {
            Ok(source) => source,
            // A system path this host does not have (or hides from the
            // caller) is left out, as it would be from the rules.
            Err(_) if system => continue,
            // The shim checked that it existed.
            Err(e) => return Err(failed("resolve", path, e)),
        };
        let inside = if system {
            match (path.parent(), path.file_name()) {
                (Some(parent), Some(name)) => match std::fs::canonicalize(parent) {
                    Ok(parent) => parent.join(name),
                    Err(_) => continue,
                },
                _ => source.clone(),
            }
        } else if source != path {
            return Err(failed(
                "bind",
                path,
                io::Error::other(format!(
                    "it now resolves to {}: a component was replaced by a symbolic link \
                     after the path was checked",
                    source.display()
                )),
            ));
        } else {
            source.clone()
        };
        let special = |p: &Path| p.starts_with("/proc") || p.starts_with("/dev");
        if special(&inside) || special(&source) {
            continue;
        }
        let relative = |p: &Path| p.strip_prefix("/").unwrap_or(p).to_owned();
        binds.push(Bind {
            inside: relative(&inside),
            source: relative(&source),
            writable,
        });
    }
    binds.sort_by_key(|b| b.inside.components().count());
    Ok(binds)
}

fn failed(what: &'static str, path: &Path, source: io::Error) -> MountError {
    MountError {
        what,
        path: path.to_owned(),
        source,
    }
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

/// A tmpfs `/dev` with [`DEVICES`] (and `tty` with `--tty`) bound from the
/// host's, `/dev/shm`, and the usual links into `/proc/self/fd`.
fn build_dev(tty: bool) -> Result<(), MountError> {
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
    let terminal = tty.then_some("tty");
    for name in DEVICES.iter().copied().chain(terminal) {
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

fn open_dir(path: &str) -> Result<OwnedFd, MountError> {
    step(
        "open",
        path,
        nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ),
    )
}

/// `openat2` below `dir`, following no symbolic link: a component that is
/// one now (a directory swapped for a link by a process of the uid since
/// the path was resolved) is `ELOOP`, never a detour.
fn open_beneath(dir: &OwnedFd, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let mut how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
    if flags.contains(OFlag::O_CREAT) {
        how = how.mode(Mode::from_bits_truncate(0o600));
    }
    openat2(dir, path, how)
}

/// The path through which `mount(2)` and `mount_setattr(2)` reach `fd`.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/newroot/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Show `bind.source` (below `from`) at `bind.inside` (below `newroot`),
/// read-only unless writable, `nosuid` and `nodev`. Both paths are opened
/// without following any symbolic link, and the mount goes through the
/// descriptors: what is bound, and where, is what was resolved.
fn bind(from: &OwnedFd, newroot: &OwnedFd, bind: &Bind) -> Result<(), MountError> {
    let shown = Path::new("/").join(&bind.inside);
    let source = match open_beneath(from, &bind.source, OFlag::O_PATH) {
        Ok(fd) => fd,
        Err(nix::Error::ENOENT) => return Ok(()),
        Err(e) => return Err(failed("open the source of", &shown, e.into())),
    };
    let is_dir = step("inspect", &shown, nix::sys::stat::fstat(&source))?.st_mode & libc::S_IFMT
        == libc::S_IFDIR;
    let (parent, name) = match (bind.inside.parent(), bind.inside.file_name()) {
        (Some(parent), Some(name)) => (parent, name),
        _ => {
            return Err(failed(
                "bind",
                &shown,
                io::Error::from(io::ErrorKind::InvalidInput),
            ))
        }
    };
    let parent = make_dirs(newroot, parent, &shown)?;
    let name = Path::new(name);
    let target = if is_dir {
        match nix::sys::stat::mkdirat(&parent, name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(failed("create", &shown, e.into())),
        }
        open_beneath(&parent, name, OFlag::O_PATH | OFlag::O_DIRECTORY)
    } else {
        match open_beneath(&parent, name, OFlag::O_PATH) {
            Err(nix::Error::ENOENT) => {
                open_beneath(&parent, name, OFlag::O_CREAT | OFlag::O_WRONLY)
            }
            other => other,
        }
    };
    let target = step("open the mount point", &shown, target)?;
    step(
        "bind",
        &shown,
        mount(
            Some(&fd_path(&source)),
            &fd_path(&target),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    // The new mount, reached from its parent directory again (the old
    // descriptor is the directory underneath it).
    let mounted = step("open", &shown, open_beneath(&parent, name, OFlag::O_PATH))?;
    let attrs = NOSUID | NODEV | if bind.writable { 0 } else { RDONLY };
    step(
        "restrict",
        &shown,
        sys::mount_setattr(&fd_path(&mounted), attrs, true),
    )
}

/// Open (creating what is missing) the directory `path` below `root`, one
/// component at a time, following no symbolic link.
fn make_dirs(root: &OwnedFd, path: &Path, shown: &Path) -> Result<OwnedFd, MountError> {
    let mut dir = step(
        "open",
        "/newroot",
        open_beneath(root, Path::new("."), OFlag::O_PATH | OFlag::O_DIRECTORY),
    )?;
    for component in path.components() {
        let name = Path::new(component.as_os_str());
        match nix::sys::stat::mkdirat(&dir, name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(failed("create a directory for", shown, e.into())),
        }
        dir = step(
            "open a directory for",
            shown,
            open_beneath(&dir, name, OFlag::O_PATH | OFlag::O_DIRECTORY),
        )?;
    }
    Ok(dir)
}
