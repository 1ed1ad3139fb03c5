// SPDX-License-Identifier: Apache-2.0
//! Leak detection: does a response (or a call parameter) carry credential
//! material, in any encoding an upstream can choose?
//!
//! [`crate::redact`] replaces a *whole* credential in the encodings an
//! honest echo produces (raw, base64, hex, JSON, percent). This module
//! judges what is left after that: it normalises the text through every
//! decoder in [`decode`] — compressed streams (gzip, zlib, zstd, found by
//! their magic), JSON/JavaScript escapes, percent-encoding, HTML character
//! references, base64 (either alphabet, line-wrapped, at every offset) and
//! hex (either case, with or without separators) — recursively, to
//! [`MAX_DEPTH`] decodings, and looks in every view for any *window* of a
//! credential: a substring of [`window_len`] bytes, matched ASCII
//! case-insensitively. A hit means the response is withheld as a whole.
//!
//! # The window length
//!
//! `window_len(n) = min(n, clamp(n / 4, 8, 32))`. A quarter of a key is
//! already a quarter of its entropy gone: a 32-character key quoted but
//! for its last 8 characters is brute-forceable, so for such a key every
//! 8-byte fragment is caught. Shorter windows would match ordinary text:
//! 8 random base64 characters, matched in any case, are about 42 bits, so
//! the chance that a 60 KiB response and all its decoded views (~1M
//! positions) contain by accident one of a 32-byte key's 25 windows is
//! about 1e-5; with 6-byte windows it would be about 1e-2. Above 128
//! bytes (PEM keys, long JWTs) the window stays at 32 bytes: 32 bytes of
//! a private key are already too many to quote, and 256 bits never occur
//! by chance. Keys
//! with a fixed public prefix longer than their window (`sk_live_` on an
//! 8-byte window) make that prefix a window: a response quoting the
//! prefix alone is withheld. That is the price of catching fragments.
//!
//! # Cost
//!
//! Credentials are fixed at load, so the windows are compiled once into
//! one Aho-Corasick automaton: each view is scanned in one linear pass.
//! A secret has at most [`MAX_WINDOWS_PER_SECRET`] windows; a longer one
//! gets them at a stride, and then any fragment of `window + stride - 1`
//! bytes is caught. Decoding is bounded: at most [`MAX_SCAN_BYTES`] of
//! views per judgement and [`MAX_INFLATED`] per decompressed stream. What
//! cannot be judged within those bounds is withheld too (fail closed).
//!
//! # Limits
//!
//! An upstream that *encrypts* (or XORs, reverses, or splits into pieces
//! shorter than a window across places the caller reassembles) defeats
//! any scanner; this one stops echoes and re-encodings, not a colluding
//! upstream that also has a key. Raw deflate without a header and base32
//! are not recognised. The automaton's copies of the windows are not
//! zeroized on drop (the crate owns them); every decoded view is.

pub mod decode;

use std::collections::HashSet;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use zeroize::Zeroizing;

use decode::Bytes;

/// The shortest window, in bytes.
pub const MIN_WINDOW: usize = 8;

/// The longest window, in bytes.
pub const MAX_WINDOW: usize = 32;

/// Windows taken from one secret at most (a longer secret is sampled at a
/// stride).
pub const MAX_WINDOWS_PER_SECRET: usize = 4096;

/// How many decodings deep a view may be. A view at this depth that still
/// decodes to something is not judged: the whole input is refused.
pub const MAX_DEPTH: usize = 8;

/// Bytes of decoded views one judgement may produce.
pub const MAX_SCAN_BYTES: usize = 16 << 20;

/// Bytes one compressed stream may expand to (a decompression bomb stops
/// here).
pub const MAX_INFLATED: usize = 4 << 20;

/// Bytes one judgement's decompressions may read and write together. A
/// hostile body can put a compressed stream's magic at every offset, each
/// stream reading the rest of the body (quadratic work); past this, the
/// response is withheld. (1 MiB in unit tests, which run unoptimised.)
pub const MAX_INFLATE_WORK: usize = if cfg!(test) { 1 << 20 } else { 16 << 20 };

/// What starting one decompression is charged, on top of what it reads
/// and writes: a gzip or zstd stream goes on through every member or
/// frame after it, and tiny ones cost far more per byte than their size,
/// so at most 64 of those are tried per judgement; a
/// zlib stream ends with its own.
fn inflate_setup(format: decode::Compression) -> usize {
    match format {
        decode::Compression::Gzip | decode::Compression::Zstd => MAX_INFLATE_WORK / 64,
        decode::Compression::Zlib => 4096,
    }
}

/// Total window bytes above which the automaton is an NFA, not a DFA.
const MAX_DFA_PATTERN_BYTES: usize = 16 * 1024;

/// The window length for a secret of `len` bytes (see the module docs).
pub fn window_len(len: usize) -> usize {
    len.min((len / 4).clamp(MIN_WINDOW, MAX_WINDOW))
}

/// The scanner could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the leak scanner: {0}")]
pub struct LeakError(String);

/// Why an input is refused. Messages name the place and the decoders,
/// never the content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Leak {
    /// A window of a credential was found.
    #[error("the response contains credential material (in {place}{})", trail_text(.trail))]
    Found {
        place: &'static str,
        trail: Vec<&'static str>,
    },
    /// A compressed stream expands beyond [`MAX_INFLATED`].
    #[error("the response holds a compressed stream (in {place}) that expands beyond {MAX_INFLATED} bytes and cannot be checked for credential material")]
    Bomb { place: &'static str },
    /// The compressed streams to try would read and write more than
    /// [`MAX_INFLATE_WORK`].
    #[error("the response holds more compressed streams (in {place}) than can be checked for credential material")]
    TooMany { place: &'static str },
    /// Decoding went deeper than [`MAX_DEPTH`] or produced more than
    /// [`MAX_SCAN_BYTES`].
    #[error(
        "the response is encoded too deeply (in {place}) to be checked for credential material"
    )]
    TooDeep { place: &'static str },
}

fn trail_text(trail: &[&'static str]) -> String {
    if trail.is_empty() {
        String::new()
    } else {
        format!(", decoded as {}", trail.join(", "))
    }
}

/// Finds windows of a fixed set of secrets in any supported encoding.
#[derive(Default)]
pub struct LeakScanner {
    windows: Option<AhoCorasick>,
    /// The shortest window of any secret: a decoded run shorter than this
    /// cannot hold one.
    shortest: usize,
    /// Whether some secret has a space (then `+` is also tried as one).
    plus_is_space: bool,
    secrets: usize,
}

impl std::fmt::Debug for LeakScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeakScanner")
            .field("secrets", &self.secrets)
            .field("shortest_window", &self.shortest)
            .finish_non_exhaustive()
    }
}

impl LeakScanner {
    /// A scanner for these secrets. Empty values are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a [u8]>) -> Result<LeakScanner, LeakError> {
        let mut windows: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut shortest = usize::MAX;
        let mut plus_is_space = false;
        let mut count = 0;
        for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
            count += 1;
            plus_is_space |= secret.contains(&b' ');
            let w = window_len(secret.len());
            shortest = shortest.min(w);
            let starts = secret.len() - w + 1;
            let stride = starts.div_ceil(MAX_WINDOWS_PER_SECRET);
            for start in (0..starts).step_by(stride) {
                windows.push(Zeroizing::new(secret[start..start + w].to_vec()));
            }
        }
        if windows.is_empty() {
            return Ok(LeakScanner::default());
        }
        windows.sort_unstable_by(|a, b| a.as_slice().cmp(b.as_slice()));
        windows.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        let total: usize = windows.iter().map(|w| w.len()).sum();
        let kind = (total > MAX_DFA_PATTERN_BYTES).then_some(AhoCorasickKind::ContiguousNFA);
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .ascii_case_insensitive(true)
            .kind(kind)
            .build(windows.iter().map(|w| w.as_slice()))
            // The builder's error names sizes, not patterns.
            .map_err(|e| LeakError(e.to_string()))?;
        Ok(LeakScanner {
            windows: Some(automaton),
            shortest,
            plus_is_space,
            secrets: count,
        })
    }

    /// Whether no secret is covered (then nothing is ever found).
    pub fn is_empty(&self) -> bool {
        self.windows.is_none()
    }

    /// Judge one value (a call parameter).
    pub fn check(&self, value: &[u8]) -> Result<(), Leak> {
        Judgement::new(self).judge("a value", value)
    }

    /// Judge an error message about to be returned (and audited): text an
    /// upstream or a program shaped (a token endpoint's error code, an
    /// STS message, a driver's diagnostic) is a channel like a body.
    pub fn check_message(&self, message: &str) -> Result<(), Leak> {
        Judgement::new(self).judge("an error message", message.as_bytes())
    }

    /// Judge a response: every header name, every header value, all
    /// values joined in order (a secret split over two headers of the
    /// same name, or of two names, reads as one), and the body.
    pub fn check_response<'h>(
        &self,
        headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
        body: &[u8],
    ) -> Result<(), Leak> {
        let mut judgement = Judgement::new(self);
        let headers: Vec<(&[u8], &[u8])> = headers.into_iter().collect();
        // Sized once: no reallocation leaves an unwiped copy behind.
        let mut joined = Zeroizing::new(Vec::with_capacity(
            headers.iter().map(|(_, value)| value.len()).sum(),
        ));
        for (name, value) in headers {
            judgement.judge("a header", name)?;
            judgement.judge("a header", value)?;
            joined.extend_from_slice(value);
        }
        judgement.judge("the headers joined", &joined)?;
        judgement.judge("the body", body)
    }
}

/// One judgement's state: the views already seen and the bytes left.
struct Judgement<'s> {
    scanner: &'s LeakScanner,
    seen: HashSet<[u8; 32]>,
    budget: usize,
    /// Bytes decompressions may still read and write together.
    inflate_work: usize,
}

/// A view to look at, and how it was reached.
struct View {
    bytes: Bytes,
    depth: usize,
    trail: Vec<&'static str>,
}

impl<'s> Judgement<'s> {
    fn new(scanner: &'s LeakScanner) -> Judgement<'s> {
        Judgement {
            scanner,
            seen: HashSet::new(),
            budget: MAX_SCAN_BYTES,
            inflate_work: MAX_INFLATE_WORK,
        }
    }

    /// Decompress one stream, charged to the work left: what it reads,
    /// what it writes, and [`inflate_setup`] for starting. A stream that
    /// would take more than is left ends the judgement: the response
    /// cannot be checked, and is withheld.
    fn inflate(
        &mut self,
        place: &'static str,
        input: &[u8],
        format: decode::Compression,
    ) -> Result<Bytes, Leak> {
        let left = self
            .inflate_work
            .checked_sub(inflate_setup(format))
            .ok_or(Leak::TooMany { place })?;
        let (out, read) = decode::decompress_metered(input, format, MAX_INFLATED, left)
            .map_err(|decode::TooLarge| Leak::Bomb { place })?;
        if read >= left && input.len() > read {
            return Err(Leak::TooMany { place });
        }
        self.inflate_work = left
            .checked_sub(read + out.len())
            .ok_or(Leak::TooMany { place })?;
        Ok(out)
    }

    fn judge(&mut self, place: &'static str, root: &[u8]) -> Result<(), Leak> {
        let Some(automaton) = &self.scanner.windows else {
            return Ok(());
        };
        if root.len() < self.scanner.shortest {
            return Ok(());
        }
        if automaton.is_match(root) {
            return Err(Leak::Found {
                place,
                trail: Vec::new(),
            });
        }
        let mut stack = Vec::new();
        self.expand(place, root, 0, &[], &mut stack)?;
        while let Some(view) = stack.pop() {
            if automaton.is_match(view.bytes.as_slice()) {
                return Err(Leak::Found {
                    place,
                    trail: view.trail,
                });
            }
            self.expand(place, &view.bytes, view.depth, &view.trail, &mut stack)?;
        }
        Ok(())
    }

    /// Push every decoding of `bytes` not seen before. Each is admitted
    /// (deduplicated, charged to the budget) as soon as it is produced, so
    /// no more than one unadmitted decoding is held at a time.
    fn expand(
        &mut self,
        place: &'static str,
        bytes: &[u8],
        depth: usize,
        trail: &[&'static str],
        stack: &mut Vec<View>,
    ) -> Result<(), Leak> {
        let shortest = self.scanner.shortest;
        let mut admit = |this: &mut Self, name: &'static str, data: Bytes| {
            this.admit(place, name, data, depth, trail, stack)
        };
        for (at, format) in decode::compressed_starts(bytes) {
            let inflated = self.inflate(place, &bytes[at..], format)?;
            admit(self, format.name(), inflated)?;
        }
        if let Some(text) = decode::unescape(bytes, false) {
            admit(self, "escapes", text)?;
        }
        if self.scanner.plus_is_space {
            if let Some(text) = decode::unescape(bytes, true) {
                admit(self, "form encoding", text)?;
            }
        }
        // A window of `shortest` bytes is at least this many characters.
        let base64_chars = (shortest * 4).div_ceil(3);
        for data in decode::base64_runs(bytes, base64_chars) {
            admit(self, "base64", data)?;
        }
        for data in decode::hex_runs(bytes, 2 * shortest) {
            admit(self, "hex", data)?;
        }
        Ok(())
    }

    /// Push one decoding, unless it is too short or seen before; refuse
    /// when it would pass the depth or the byte budget.
    fn admit(
        &mut self,
        place: &'static str,
        name: &'static str,
        data: Bytes,
        depth: usize,
        trail: &[&'static str],
        stack: &mut Vec<View>,
    ) -> Result<(), Leak> {
        if data.len() < self.scanner.shortest {
            return Ok(());
        }
        let hash = *blake3::hash(&data).as_bytes();
        if !self.seen.insert(hash) {
            return Ok(());
        }
        if depth + 1 > MAX_DEPTH || data.len() > self.budget {
            return Err(Leak::TooDeep { place });
        }
        self.budget -= data.len();
        let mut trail = trail.to_vec();
        trail.push(name);
        stack.push(View {
            bytes: data,
            depth: depth + 1,
            trail,
        });
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
