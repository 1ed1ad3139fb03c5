// SPDX-License-Identifier: Apache-2.0
//! URL path segments as the most hostile server would read them.
//!
//! A value placed in a URL path is percent-encoded, so a server that
//! decodes once sees exactly the value. Servers do more than that: some
//! decode twice (or until nothing changes), some read `%uXXXX` (IIS),
//! `\` as `/` (Windows servers, many proxies), drop a `;...` path
//! parameter before judging a segment (Tomcat's `..;/`), strip trailing
//! dots and spaces (Windows), apply Unicode compatibility normalisation
//! (NFKC, which turns a fullwidth solidus `／` into `/`), or map a few
//! other slash lookalikes "best fit". So a segment is judged at every
//! decoding depth, up to [`MAX_DECODES`], and on the NFKC form of each, and
//! refused if any of them could be read as more than one segment, as `.`
//! or `..`, or as empty. Two lookalikes of `\` used by legacy code pages
//! (`¥`, `₩`) are allowed: they matter only to Windows "best fit"
//! conversion to a CJK code page, and refusing them would refuse ordinary
//! text.
//!
//! A parameter of type `path` is a relative path: segments joined by `/`,
//! each judged the same way, none empty. Its `prefix` (in the policy or a
//! token) is judged on whole segments, like [`std::path::Path::starts_with`]:
//! `reports/` admits `reports/q1.txt`, not `reports-evil/x` nor, since a
//! path value never has a `..` segment, `reports/../private`.

use std::borrow::Cow;

use unicode_normalization::UnicodeNormalization;

/// Decoding depth judged; a value still changing after this many decodes
/// is refused.
pub const MAX_DECODES: usize = 8;

/// Characters some servers or code pages map to `/` or `\`: those NFKC
/// leaves alone, and the fullwidth and small forms it maps (listed too, so
/// that their refusal does not rest on normalisation alone).
const LOOKALIKES: &[char] = &[
    '\u{2044}', // FRACTION SLASH
    '\u{2215}', // DIVISION SLASH
    '\u{2216}', // SET MINUS
    '\u{29F5}', // REVERSE SOLIDUS OPERATOR
    '\u{29F8}', // BIG SOLIDUS
    '\u{29F9}', // BIG REVERSE SOLIDUS
    '\u{FE68}', // SMALL REVERSE SOLIDUS
    '\u{FF0F}', // FULLWIDTH SOLIDUS
    '\u{FF3C}', // FULLWIDTH REVERSE SOLIDUS
];

/// Why a text is not one safe URL path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentFault {
    /// Empty or blank, or nothing before a `;`.
    Empty,
    /// A `/` at some decoding depth.
    Separator,
    /// A `\` at some decoding depth.
    Backslash,
    /// `.` or `..` (also `...`, `. `, `..;x`) at some decoding depth.
    Dot,
    /// A Windows drive (`C:`) at the start, at some decoding depth.
    Drive,
    /// A control character (NUL, CR, LF, ...) at some decoding depth.
    Control,
    /// Decodes to bytes that are not UTF-8 (an overlong `/` is `%C0%AF`).
    NotUtf8,
    /// A character that normalisation or "best fit" turns into `/`, `\`,
    /// `.` or `%`.
    Lookalike,
    /// Still percent-encoded after [`MAX_DECODES`] decodes.
    TooDeep,
}

impl SegmentFault {
    /// Completes "parameter X of tool T ...". `multi` for a segment of a
    /// `path` parameter, else the parameter is one segment.
    pub fn describe(self, multi: bool) -> &'static str {
        match (self, multi) {
            (SegmentFault::Empty, false) => "makes an empty or blank URL path segment",
            (SegmentFault::Empty, true) => "has an empty or blank segment",
            (SegmentFault::Separator, false) => {
                "contains \"/\" or an encoding of it, but is one URL path segment"
            }
            (SegmentFault::Separator, true) => "has a segment that contains an encoded \"/\"",
            (SegmentFault::Backslash, false) => {
                "contains \"\\\" or an encoding of it, which servers may read as \"/\""
            }
            (SegmentFault::Backslash, true) => {
                "has a segment that contains \"\\\" or an encoding of it, \
                 which servers may read as \"/\""
            }
            (SegmentFault::Dot, false) => {
                "makes a \".\" or \"..\" URL path segment (after percent-decoding, \
                 or before a \";\")"
            }
            (SegmentFault::Dot, true) => {
                "has a \".\" or \"..\" segment (after percent-decoding, or before a \";\")"
            }
            (SegmentFault::Drive, _) => {
                "starts with a Windows drive such as \"C:\" (after percent-decoding), \
                 which servers may read as an absolute path"
            }
            (SegmentFault::Control, _) => {
                "contains a control character (after percent-decoding) in a URL path segment"
            }
            (SegmentFault::NotUtf8, _) => {
                "percent-decodes to bytes that are not UTF-8 (such as an overlong \"/\")"
            }
            (SegmentFault::Lookalike, _) => {
                "contains a character that Unicode normalisation turns into \"/\", \"\\\", \
                 \".\" or \"%\" (such as a fullwidth solidus)"
            }
            (SegmentFault::TooDeep, _) => "is percent-encoded more than 8 levels deep",
        }
    }
}

/// Check one segment as a server receives it after its first decode:
/// for a value the broker encodes, the value itself.
pub fn check_segment(text: &str) -> Result<(), SegmentFault> {
    check_levels(text.as_bytes(), true)
}

/// Check one segment as it is on the wire (percent-encoded): also the
/// `%2e` forms a URL parser resolves as dot segments before sending.
pub fn check_wire_segment(wire: &str) -> Result<(), SegmentFault> {
    let dotted = wire.to_ascii_lowercase().replace("%2e", ".");
    check_core(&dotted)?;
    match decode(wire.as_bytes())? {
        Some(decoded) => check_levels(&decoded, true),
        None => check_levels(wire.as_bytes(), true),
    }
}

/// Check the value of a `path` parameter: one or more segments joined by
/// `/`, each a safe segment.
pub fn check_path(text: &str) -> Result<(), SegmentFault> {
    text.split('/').try_for_each(check_segment)
}

/// A `path` parameter's prefix in canonical form: whole segments, each
/// with a `/` after it (`reports` and `reports/` are both `reports/`;
/// the empty prefix stays empty and admits every path).
pub fn canonical_prefix(prefix: &str) -> Result<String, SegmentFault> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    check_path(trimmed)?;
    Ok(format!("{trimmed}/"))
}

/// Whether `path` starts with the whole segments of `prefix` (a trailing
/// `/` on the prefix is ignored): `reports/` admits `reports` and
/// `reports/a`, not `reports-evil/a`.
pub fn has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    if prefix.is_empty() {
        return true;
    }
    let mut segments = path.split('/');
    prefix.split('/').all(|p| segments.next() == Some(p))
}

/// Judge `first` and every decoding of it, each also in NFKC form when
/// `normalise` (an NFKC form's own decodings are judged without a further
/// NFKC branch, so the work stays bounded).
fn check_levels(first: &[u8], normalise: bool) -> Result<(), SegmentFault> {
    let mut level = Cow::Borrowed(first);
    for _ in 0..=MAX_DECODES {
        let text = std::str::from_utf8(&level).map_err(|_| SegmentFault::NotUtf8)?;
        check_text(text)?;
        if !text.is_ascii() {
            let nfkc: String = text.nfkc().collect();
            if nfkc != text {
                if nfkc.matches('%').count() != text.matches('%').count() {
                    return Err(SegmentFault::Lookalike);
                }
                let judged = if normalise {
                    check_levels(nfkc.as_bytes(), false)
                } else {
                    check_text(&nfkc)
                };
                judged.map_err(|fault| match fault {
                    SegmentFault::TooDeep => SegmentFault::TooDeep,
                    _ => SegmentFault::Lookalike,
                })?;
            }
        }
        match decode(&level)? {
            Some(next) => level = Cow::Owned(next),
            None => return Ok(()),
        }
    }
    Err(SegmentFault::TooDeep)
}

/// One decoding depth, as text.
fn check_text(text: &str) -> Result<(), SegmentFault> {
    if text.chars().any(char::is_control) {
        return Err(SegmentFault::Control);
    }
    if text.contains('/') {
        return Err(SegmentFault::Separator);
    }
    if text.contains('\\') {
        return Err(SegmentFault::Backslash);
    }
    if text.contains(LOOKALIKES) {
        return Err(SegmentFault::Lookalike);
    }
    // `C:` roots a path on Windows: joined onto a directory, `C:x` or
    // `C:/x` replaces it (.NET's Path.Combine, Python's os.path.join).
    if let [letter, b':', ..] = text.as_bytes() {
        if letter.is_ascii_alphabetic() {
            return Err(SegmentFault::Drive);
        }
    }
    check_core(text)
}

/// The part of a segment a server judges: before a `;` path parameter
/// (Tomcat, Jetty), without trailing dots and spaces (Windows), nor
/// whitespace trimmed at either end (Unicode whitespace, and `+`, which
/// is a space to a server that form-decodes its path), nor the invisible
/// characters some normalisations and file systems drop
/// ([`is_default_ignorable`]).
fn check_core(text: &str) -> Result<(), SegmentFault> {
    let core = text.split(';').next().unwrap_or_default();
    let blank = |c: char| c.is_whitespace() || c == '+' || is_default_ignorable(c);
    if core.chars().all(blank) {
        return Err(SegmentFault::Empty);
    }
    if core.chars().all(|c| c == '.' || blank(c)) {
        return Err(SegmentFault::Dot);
    }
    Ok(())
}

/// Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt):
/// invisible characters that NFKC_Casefold removes and HFS+ ignores in
/// names, so `.\u{200B}.` can be read as `..`.
fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{AD}'
            | '\u{34F}'
            | '\u{61C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// One round of percent-decoding, `%XX` and IIS's `%uXXXX`; `None` when
/// there is nothing to decode.
fn decode(bytes: &[u8]) -> Result<Option<Vec<u8>>, SegmentFault> {
    use crate::percent::{percent_byte, percent_unicode};
    if !bytes.contains(&b'%') {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut changed = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            if let Some(byte) = percent_byte(&bytes[i..]) {
                out.push(byte);
                i += 3;
                changed = true;
                continue;
            }
            if let Some(unit) = percent_unicode(&bytes[i..]) {
                let c = char::from_u32(unit).ok_or(SegmentFault::NotUtf8)?;
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                i += 6;
                changed = true;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    Ok(changed.then_some(out))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::Strategy;
    use SegmentFault::*;

    #[test]
    fn plain_segments_pass() {
        for ok in [
            "a",
            "hello.txt",
            "...txt",
            "a..b",
            ".hidden",
            "a;b",
            "100%",
            "%zz",
            "é",
            "日本語",
            "a b",
            "…txt",
            "¥100",
            "file..",
            "c++",
            "a+b",
            "+1",
            "10:30",
            "urn:x",
            "ab:c",
            "a\u{200D}b",
        ] {
            assert_eq!(check_segment(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn hostile_segments_are_refused() {
        let cases: &[(&str, SegmentFault)] = &[
            ("", Empty),
            (" ", Empty),
            (";x", Empty),
            ("%20", Empty),
            (".", Dot),
            ("..", Dot),
            ("...", Dot),
            (". .", Dot),
            (".. ", Dot),
            ("..;", Dot),
            ("..;jsessionid=1", Dot),
            ("%2e%2E", Dot),
            // `+` is a space to a server that form-decodes its path, and
            // a server may trim any Unicode whitespace, at either end.
            ("+", Empty),
            ("%2B", Empty),
            ("..+", Dot),
            (".+.", Dot),
            (" ..", Dot),
            ("+..", Dot),
            ("..\u{2028}", Dot),
            ("\u{1680}..", Dot),
            // Invisible characters some normalisations drop.
            (".\u{200B}.", Dot),
            ("..\u{FEFF}", Dot),
            ("\u{AD}", Empty),
            ("%E2%80%8B..", Dot),
            (".%2e", Dot),
            ("%252e%252e", Dot),
            ("%25252e.", Dot),
            ("%u002e%u002E", Dot),
            ("a/b", Separator),
            ("..%2Fprivate", Separator),
            ("a%2fb", Separator),
            ("a%252Fb", Separator),
            ("a%25252fb", Separator),
            ("a%u002fb", Separator),
            ("a%U002Fb", Separator),
            ("C:", Drive),
            ("c:x", Drive),
            ("a:", Drive),
            ("C%3A", Drive),
            ("C%253a..", Drive),
            ("C\u{FF1A}", Lookalike),
            ("a\\b", Backslash),
            ("a%5cb", Backslash),
            ("a%5Cb", Backslash),
            ("a%255cb", Backslash),
            ("a\0b", Control),
            ("a%00b", Control),
            ("..%00.txt", Control),
            ("a%0d%0ab", Control),
            ("a%09b", Control),
            ("a%C0%AFb", NotUtf8),
            ("%c0%ae%c0%ae", NotUtf8),
            ("%e0%80%af", NotUtf8),
            ("%ff", NotUtf8),
            ("%uD800", NotUtf8),
            ("a\u{FF0F}b", Lookalike),
            ("a\u{2215}b", Lookalike),
            ("a\u{2044}b", Lookalike),
            ("a\u{FF3C}b", Lookalike),
            ("\u{FF0E}\u{FF0E}", Lookalike),
            ("\u{2025}", Lookalike),
            ("\u{2024}", Lookalike),
            ("\u{FE52}.", Lookalike),
            ("a%EF%BC%8Fb", Lookalike),
            ("a\u{FF05}2Fb", Lookalike),
            ("a%\u{FF12}\u{FF26}b", Lookalike),
        ];
        for (text, fault) in cases {
            assert_eq!(check_segment(text), Err(*fault), "{text:?}");
        }
        assert!(TooDeep
            .describe(false)
            .contains(&format!(" {MAX_DECODES} levels")));
        let deep = format!("a%{}2Fb", "25".repeat(MAX_DECODES));
        assert_eq!(check_segment(&deep), Err(TooDeep));
        let shallow = format!("a%{}41b", "25".repeat(MAX_DECODES - 1));
        assert_eq!(check_segment(&shallow), Ok(()));
    }

    #[test]
    fn wire_segments_include_the_parsers_dot_forms() {
        for dots in ["..", "%2e%2E", ".%2E", "%2e", "%2E."] {
            assert_eq!(check_wire_segment(dots), Err(Dot), "{dots:?}");
        }
        assert_eq!(check_wire_segment("%252e%252e"), Err(Dot));
        assert_eq!(check_wire_segment("..%2Fx"), Err(Separator));
        assert_eq!(check_wire_segment(""), Err(Empty));
        assert_eq!(check_wire_segment("a%20b"), Ok(()));
        assert_eq!(check_wire_segment("%2e%2etxt"), Ok(()));
    }

    #[test]
    fn paths_are_checked_segment_by_segment() {
        assert_eq!(check_path("reports/q1.txt"), Ok(()));
        assert_eq!(check_path("a"), Ok(()));
        assert_eq!(check_path("reports/../../private/admin.txt"), Err(Dot));
        assert_eq!(check_path("reports/./x"), Err(Dot));
        assert_eq!(check_path("/etc/passwd"), Err(Empty));
        assert_eq!(check_path("a//b"), Err(Empty));
        assert_eq!(check_path("a/"), Err(Empty));
        assert_eq!(check_path(""), Err(Empty));
        assert_eq!(check_path("a/b%2F..%2Fc"), Err(Separator));
        assert_eq!(check_path("a\\..\\b"), Err(Backslash));
        assert_eq!(check_path("a/..;/b"), Err(Dot));
        assert_eq!(check_path("reports/..+/x"), Err(Dot));
        assert_eq!(check_path("C:/Windows/win.ini"), Err(Drive));
        assert_eq!(check_path("reports/c:/x"), Err(Drive));
    }

    #[test]
    fn prefixes_are_whole_segments() {
        assert_eq!(canonical_prefix("reports").unwrap(), "reports/");
        assert_eq!(canonical_prefix("reports/").unwrap(), "reports/");
        assert_eq!(canonical_prefix("a/b/").unwrap(), "a/b/");
        assert_eq!(canonical_prefix("").unwrap(), "");
        assert_eq!(canonical_prefix("/"), Ok(String::new()));
        assert_eq!(canonical_prefix("a//"), Err(Empty));
        assert_eq!(canonical_prefix("../x"), Err(Dot));
        for (path, prefix, ok) in [
            ("reports/q1.txt", "reports/", true),
            ("reports/q1.txt", "reports", true),
            ("reports", "reports/", true),
            ("reports/a/b", "reports/a", true),
            ("reports-evil/x", "reports/", false),
            ("reports-evil/x", "reports", false),
            ("reportsx", "reports", false),
            ("report", "reports", false),
            ("reports/a", "reports/a/b", false),
            ("anything", "", true),
        ] {
            assert_eq!(has_prefix(path, prefix), ok, "{path:?} under {prefix:?}");
        }
    }

    #[test]
    fn work_is_bounded() {
        // Long hostile inputs finish: no quadratic decode-until-fixpoint.
        let long = format!("%{}2F", "25".repeat(30_000));
        assert_eq!(check_segment(&long), Err(TooDeep));
        let wide = "\u{FF21}%25".repeat(10_000);
        assert!(check_segment(&wide).is_ok());
    }

    /// One thing a server may do to a segment before it judges it.
    fn server_step(step: u8, text: &str) -> String {
        use unicode_normalization::UnicodeNormalization;
        match step {
            0 => percent_encoding::percent_decode_str(text)
                .decode_utf8_lossy()
                .into_owned(),
            1 => match decode(text.as_bytes()) {
                Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                _ => text.to_owned(),
            },
            2 => text.replace('+', " "),
            3 => text.nfkc().collect(),
            4 => text.nfd().collect(),
            5 => text.trim().to_owned(),
            6 => text.trim_end_matches(['.', ' ']).to_owned(),
            7 => text.split(';').next().unwrap_or_default().to_owned(),
            8 => text.replace('\\', "/"),
            9 => text.to_lowercase(),
            10 => text.chars().filter(|&c| !is_default_ignorable(c)).collect(),
            _ => text.nfkc().collect::<String>().to_lowercase(),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 3000,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// A segment accepted here stays one segment that is not empty,
        /// `.` or `..` through any few steps a server may take: decoding
        /// (`%XX`, `%uXXXX`, `+`), normalising (NFKC, NFD, case), trimming
        /// (whitespace, trailing dots, invisible characters), dropping a
        /// `;` parameter, reading `\\` as `/`.
        #[test]
        fn accepted_segments_survive_server_steps(
            value in proptest::collection::vec(
                proptest::sample::select(vec![
                    ".", "..", "%", "2", "5", "e", "E", "f", "F", "c", "C", "u", "0", "+",
                    " ", ";", "\\", "a", "%2e", "%25", "%2f", "%u002e", "%2B", "\u{FF0E}",
                    "\u{2024}", "\u{FF05}", "\u{FF12}", "\u{FF25}", "\u{200B}", "\u{AD}",
                    "\u{FEFF}", "\u{130}", "\u{212A}", "\u{2025}", "\u{FE52}", "\u{307}",
                    "\u{2044}", "\u{FF3C}", "\u{A0}", "\u{2028}", "\u{FF1A}", ":",
                ]),
                0..8,
            )
            .prop_map(|atoms: Vec<&str>| atoms.concat()),
            steps in proptest::collection::vec(0u8..12, 0..5),
        ) {
            if check_segment(&value).is_ok() {
                let mut seen = value.clone();
                for &step in &steps {
                    seen = server_step(step, &seen);
                }
                proptest::prop_assert!(
                    !seen.is_empty() && seen != "." && seen != ".." && !seen.contains(['/', '\0']),
                    "{value:?} through steps {steps:?} is {seen:?}"
                );
            }
        }
    }
}
