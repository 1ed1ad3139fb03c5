// SPDX-License-Identifier: Apache-2.0
//! The on-disk form of the token state: an append-only log of frames, one
//! frame per group commit, each frame a checksummed batch of records.
//!
//! Frame: `u32` little-endian payload length, the first 4 bytes of the
//! BLAKE3 hash of that length, the first 8 bytes of the payload's BLAKE3
//! hash, then the payload (the records' postcard encodings one after
//! another). The length has its own check so that a damaged length is
//! never mistaken for a torn frame running past the end of the file. A
//! frame is written whole and `fdatasync`ed before any record in it takes
//! effect, so after a crash only the last frame can be torn, and its
//! records were never acknowledged: it is cut off. A bad frame with
//! anything but zeros after it is corruption, and the broker refuses to
//! start rather than forget revocations.
//!
//! The first frame holds one record, `Format(version)`. [`Log::open`]
//! checks it before anything else and changes nothing in a file whose
//! first frame is not a format record of a version it reads: such a file
//! (a newer broker's log, or not a log at all) is refused with an error
//! naming it, and only a valid log's torn last frame is ever cut off. A
//! new log is written whole under a temporary name and renamed into
//! place, so a crash never leaves a half-written header behind.
//!
//! Versions: format 2 recorded a mint as [`MintV2`] (issuer, expiry, use
//! limit, owner); format 3 ([`Record::Mint`]) adds the token's audience,
//! task and ancestors. Both are read; a format 2 log is rewritten as
//! format 3 at start.
//!
//! Compaction rewrites the live state as a fresh log (temporary file,
//! fsync, rename, fsync of the directory) once the log has grown to twice
//! the size of the last one written whole.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use keyward_proto::token::TokenId;

use super::{MintRecord, StateError};

/// File name of the log in the state directory.
pub const LOG_FILE: &str = "tokens.log";
/// The log's format version, in its first record.
pub const FORMAT_VERSION: u32 = 3;
/// The first format of the log (whose mints lack origin), still read.
pub const FORMAT_V2: u32 = 2;
/// Largest frame read back (a compacted snapshot is split below this).
const MAX_FRAME: usize = 16 << 20;
/// Bytes of records per frame of a snapshot (a record is far smaller
/// than `MAX_FRAME - SNAPSHOT_FRAME`).
const SNAPSHOT_FRAME: usize = 1 << 20;
const HEADER: usize = 16;

/// One change to the state. Every record is absolute (a use count is the
/// count, not an increment), so replaying one twice changes nothing.
///
/// postcard encodes a variant by its index: variants are only ever
/// appended, never reordered or changed, so that every earlier format
/// still decodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Record {
    /// First record of every log file.
    Format(u32),
    /// A mint as format 2 recorded it (read, never written).
    MintV2(TokenId, MintV2),
    /// Uses counted so far, per token.
    Uses(Vec<(TokenId, u32)>),
    /// A revocation and the token's expiry (when known).
    Revoke(TokenId, u64),
    /// The latest unix time the state has seen.
    Clock(u64),
    /// A mint, with its origin (format 3).
    Mint(TokenId, MintRecord),
}

/// A mint as format 2 recorded it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MintV2 {
    pub issuer: String,
    pub expires: u64,
    pub max_uses: Option<u32>,
    pub owner: u32,
    pub attenuated: bool,
}

impl From<MintV2> for MintRecord {
    fn from(old: MintV2) -> MintRecord {
        MintRecord {
            issuer: old.issuer,
            expires: old.expires,
            max_uses: old.max_uses,
            owner: old.owner,
            attenuated: old.attenuated,
            origin: None,
        }
    }
}

/// What opening found.
#[derive(Debug)]
pub struct Opened {
    pub log: Log,
    pub records: Vec<Record>,
    /// The format version the file was written in.
    pub version: u32,
}

/// An open log, positioned at its end.
#[derive(Debug)]
pub struct Log {
    pub path: PathBuf,
    file: File,
    /// Bytes of whole frames.
    pub len: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Encode records as one frame: the payload is the records' postcard
/// encodings one after another.
pub fn frame(records: &[Record]) -> Vec<u8> {
    let mut payload = Vec::new();
    for record in records {
        payload = postcard::to_extend(record, payload)
            .expect("postcard encodes these plain types into a Vec");
    }
    seal(&payload)
}

fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&blake3::hash(&len).as_bytes()[..4]);
    out.extend_from_slice(&blake3::hash(payload).as_bytes()[..8]);
    out.extend_from_slice(payload);
    out
}

impl Log {
    /// Open (or create) the log and read every record in it. The format
    /// header is checked first: a file that is not a log of a version
    /// this broker reads is refused and left as it is. In a valid log a
    /// torn last frame is cut off; any other damage is an error.
    pub fn open(dir: &Path) -> Result<Opened, StateError> {
        let path = dir.join(LOG_FILE);
        let open = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path);
        let mut file = match open {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Log::create(&path).map(|log| Opened {
                    log,
                    records: Vec::new(),
                    version: FORMAT_VERSION,
                });
            }
            Err(source) => return Err(open_error(&path, source)),
        };
        let meta = file.metadata().map_err(io(&path))?;
        if !meta.is_file() {
            return Err(StateError::NotALog {
                path,
                what: "it is not a regular file".into(),
            });
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io(&path))?;
        // The header, before anything is changed.
        let (version, mut at) = match check_header(&bytes) {
            Header::Valid(version, used) => (version, used),
            // Nothing was ever recorded in it: an empty file, or the
            // header of a new log cut short by a crash (brokers before
            // format 3 wrote it in place).
            Header::Unwritten => {
                drop(file);
                let log = Log::write_new(&path, true)?;
                return Ok(Opened {
                    log,
                    records: Vec::new(),
                    version: FORMAT_VERSION,
                });
            }
            Header::Version(version) => return Err(StateError::Version { path, version }),
            Header::Missing(what) => return Err(StateError::NotALog { path, what }),
            Header::Damaged => {
                return Err(StateError::Corrupt {
                    path,
                    message: "its format header is damaged".into(),
                })
            }
        };
        let corrupt = |message: String| StateError::Corrupt {
            path: path.clone(),
            message,
        };
        let mut records = Vec::new();
        while at < bytes.len() {
            let rest = &bytes[at..];
            let zero = |bytes: &[u8]| bytes.iter().all(|&b| b == 0);
            let torn = match read_frame(rest) {
                Frame::Whole(batch, used) => {
                    records.extend(batch);
                    at += used;
                    continue;
                }
                // A good length whose frame runs past the end: the last
                // write, cut short.
                Frame::Torn => true,
                // The frame is all there but its payload does not check:
                // torn only if it is the last (or only zeros follow, the
                // file having grown before its data reached the disk).
                Frame::BadPayload(end) => end == rest.len() || zero(&rest[end..]),
                // A damaged length: torn only if nothing but zeros is
                // left.
                Frame::BadLength => zero(rest),
            };
            if !torn {
                return Err(corrupt(format!("a damaged record at byte {at}")));
            }
            break;
        }
        if records.iter().any(|r| matches!(r, Record::Format(_))) {
            return Err(corrupt("a second format record".into()));
        }
        let len = at as u64;
        if len < bytes.len() as u64 {
            // A valid log's torn last frame, never acknowledged.
            file.set_len(len).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        file.seek(SeekFrom::Start(len)).map_err(io(&path))?;
        Ok(Opened {
            log: Log { path, file, len },
            records,
            version,
        })
    }

    /// A new log holding only its header, written whole under a temporary
    /// name and linked into place (never over an existing file).
    fn create(path: &Path) -> Result<Log, StateError> {
        Log::write_new(path, false)
    }

    /// [`Log::create`], or with `replace` renamed over the file at `path`
    /// (one that never held a whole header): either way a crash leaves the
    /// old file or the new one, never a half-written header.
    fn write_new(path: &Path, replace: bool) -> Result<Log, StateError> {
        let tmp = path.with_extension("log.new");
        let err = io(&tmp);
        // Ours: a creation cut short before its rename.
        let mut file = super::fresh_private(&tmp).map_err(|source| open_error(&tmp, source))?;
        let len = match write_header(&mut file) {
            Ok(len) => len,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(err(e));
            }
        };
        let placed = if replace {
            std::fs::rename(&tmp, path)
        } else {
            // link(2) refuses to replace a file that appeared meanwhile.
            std::fs::hard_link(&tmp, path)
        };
        let _ = std::fs::remove_file(&tmp);
        placed.map_err(|source| open_error(path, source))?;
        super::sync_dir(path).map_err(io(path))?;
        Ok(Log {
            path: path.to_owned(),
            file,
            len,
        })
    }

    /// Append one frame and make it durable. On failure the log is cut
    /// back to its last whole frame (so a later append does not follow
    /// garbage); if even that fails, the error says so and the caller
    /// must stop writing.
    pub fn append(&mut self, frame: &[u8]) -> Result<(), AppendError> {
        let result = self
            .file
            .write_all(frame)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                let undo = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(drop));
                match undo {
                    Ok(()) => Err(AppendError::Failed(e)),
                    Err(_) => Err(AppendError::Broken(e)),
                }
            }
        }
    }

    /// Keep `bytes` allocated past the end of the log (without growing
    /// it), so that a revocation can still be written when the file
    /// system is full. `Ok(false)` when the space is not there.
    pub fn reserve(&self, bytes: u64) -> std::io::Result<bool> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let len = i64::try_from(bytes).unwrap_or(i64::MAX);
        let at = i64::try_from(self.len).unwrap_or(i64::MAX);
        match fallocate(&self.file, FallocateFlags::FALLOC_FL_KEEP_SIZE, at, len) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::ENOSPC | nix::errno::Errno::EDQUOT) => Ok(false),
            // No fallocate here: judge by the free space instead.
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let fs = nix::sys::statvfs::fstatvfs(&self.file).map_err(std::io::Error::from)?;
                let free = fs.blocks_available().saturating_mul(fs.fragment_size());
                Ok(free >= bytes)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replace the log with `records` (the live state), durably. The old
    /// log stays in place if anything fails.
    pub fn rewrite(&mut self, records: &[Record]) -> Result<(), StateError> {
        let tmp = self.path.with_extension("log.tmp");
        let err = io(&tmp);
        let mut file = super::fresh_private(&tmp).map_err(&err)?;
        let mut len = 0u64;
        let written = (|| {
            let header = frame(&[Record::Format(FORMAT_VERSION)]);
            file.write_all(&header)?;
            len += header.len() as u64;
            let mut payload = Vec::new();
            for (i, record) in records.iter().enumerate() {
                payload = postcard::to_extend(record, payload)
                    .expect("postcard encodes these plain types into a Vec");
                if payload.len() >= SNAPSHOT_FRAME || i + 1 == records.len() {
                    let bytes = seal(&payload);
                    file.write_all(&bytes)?;
                    len += bytes.len() as u64;
                    payload.clear();
                }
            }
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        // Once renamed, the new file is the log: appends go to it even if
        // the directory sync below fails (appending to the old, unnamed
        // file would confirm records that a restart never sees).
        self.file = file;
        self.len = len;
        super::sync_dir(&self.path).map_err(io(&self.path))
    }
}

/// Why an append failed.
#[derive(Debug)]
pub enum AppendError {
    /// Nothing was written.
    Failed(std::io::Error),
    /// The log could not be cut back: stop writing.
    Broken(std::io::Error),
}

fn open_error(path: &Path, source: std::io::Error) -> StateError {
    match source.raw_os_error() {
        Some(libc::EROFS) => StateError::ReadOnly {
            path: path.to_owned(),
        },
        _ => io(path)(source),
    }
}

/// Write the format header at the file's position and make it durable;
/// its length.
fn write_header(file: &mut File) -> std::io::Result<u64> {
    let header = frame(&[Record::Format(FORMAT_VERSION)]);
    file.write_all(&header)?;
    file.sync_all()?;
    Ok(header.len() as u64)
}

/// What a file's first frame says it is.
enum Header {
    /// A log of a version this broker reads; the header's length.
    Valid(u32, usize),
    /// Empty, or a prefix of a header this broker (or an older one)
    /// writes: a creation cut short, with nothing recorded.
    Unwritten,
    /// A log of a version this broker does not read.
    Version(u32),
    /// A header of a version this broker reads, followed in its frame by
    /// what no version writes.
    Damaged,
    /// Not a log: why.
    Missing(String),
}

fn check_header(bytes: &[u8]) -> Header {
    if bytes.is_empty() {
        return Header::Unwritten;
    }
    match read_frame(bytes) {
        Frame::Whole(records, used) => match records.as_slice() {
            [Record::Format(v)] if *v == FORMAT_VERSION || *v == FORMAT_V2 => {
                Header::Valid(*v, used)
            }
            [Record::Format(v)] => Header::Version(*v),
            _ => Header::Missing("its first record is not a format header".into()),
        },
        Frame::Torn
            if [FORMAT_VERSION, FORMAT_V2]
                .iter()
                .any(|v| frame(&[Record::Format(*v)]).starts_with(bytes)) =>
        {
            Header::Unwritten
        }
        Frame::BadPayload(_) | Frame::Torn => {
            // A frame whose payload is not records of ours may still
            // name a version in its first bytes: a newer log.
            match read_version(bytes) {
                Some(v) if v != FORMAT_VERSION && v != FORMAT_V2 => Header::Version(v),
                Some(_) => Header::Damaged,
                None => Header::Missing("it does not start with a format header".into()),
            }
        }
        Frame::BadLength => Header::Missing("it does not start with a format header".into()),
    }
}

/// The version in a first frame whose payload does not decode whole
/// (a later format may add records this one cannot read), if its
/// checksum holds and it starts with a format record.
fn read_version(bytes: &[u8]) -> Option<u32> {
    let header = bytes.get(..HEADER)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let payload = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    if blake3::hash(payload).as_bytes()[..8] != header[8..HEADER] {
        return None;
    }
    match postcard::take_from_bytes::<Record>(payload) {
        Ok((Record::Format(v), _)) => Some(v),
        _ => None,
    }
}

enum Frame {
    Whole(Vec<Record>, usize),
    Torn,
    /// The frame ends at this offset but its payload is damaged.
    BadPayload(usize),
    BadLength,
}

fn read_frame(bytes: &[u8]) -> Frame {
    let Some(header) = bytes.get(..HEADER) else {
        return Frame::Torn;
    };
    let len_bytes = [header[0], header[1], header[2], header[3]];
    let len = u32::from_le_bytes(len_bytes) as usize;
    if blake3::hash(&len_bytes).as_bytes()[..4] != header[4..8] || len == 0 || len > MAX_FRAME {
        return Frame::BadLength;
    }
    let Some(payload) = bytes.get(HEADER..HEADER + len) else {
        return Frame::Torn;
    };
    if blake3::hash(payload).as_bytes()[..8] != header[8..HEADER] {
        return Frame::BadPayload(HEADER + len);
    }
    let mut records = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        match postcard::take_from_bytes::<Record>(rest) {
            Ok((record, tail)) => {
                records.push(record);
                rest = tail;
            }
            Err(_) => return Frame::BadPayload(HEADER + len),
        }
    }
    Frame::Whole(records, HEADER + len)
}
