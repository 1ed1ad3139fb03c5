// SPDX-License-Identifier: Apache-2.0
//! Credentials: loaded once at start, held only in zeroize-on-drop buffers.
//!
//! Each credential is one file in a directory that only the broker may
//! read: `$CREDENTIALS_DIRECTORY` under systemd (`LoadCredential=`), else
//! `broker.credentials_dir`. Loading refuses anything an attacker could
//! have planted or read: a group- or world-accessible directory or file, a
//! symlink or other non-regular file, and values too short to redact
//! reliably. Errors name the credential and the path, never the content.
//!
//! A credential may also be of a kind whose value changes while the broker
//! runs (`kind = "oauth2"`, [`oauth`]): redaction and the leak scanner
//! cover what every credential holds *now* ([`Coverage`]), rebuilt before
//! a new value is first used.

pub mod oauth;

pub mod aws;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use zeroize::Zeroizing;

use crate::access;
use crate::leak::{LeakError, LeakScanner};
use crate::redact::{RedactError, Redactor};

/// Shortest accepted secret, in bytes (after trimming one trailing
/// newline). Shorter values would make redaction match ordinary text and
/// their encoded fragments too short to find.
pub const MIN_SECRET_LEN: usize = 8;

/// Longest accepted credential file, in bytes.
pub const MAX_SECRET_LEN: usize = 64 * 1024;

/// A secret value. Zeroized on drop; `Debug` prints `[redacted]`. It has
/// no `Display` on purpose: the only way to the bytes is [`Secret::expose`].
///
/// The bytes live in pages of their own, locked in RAM and excluded from
/// core dumps ([`crate::sys::SecretPages`]); where the kernel refuses the
/// mapping, in a heap buffer that still zeroizes on drop.
pub struct Secret(Storage);

enum Storage {
    Pages(crate::sys::SecretPages),
    Heap(Zeroizing<Vec<u8>>),
}

impl Secret {
    /// Take a buffer that already zeroizes on drop; its content moves into
    /// locked pages and the buffer is wiped.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Secret {
        match crate::sys::SecretPages::new(&bytes) {
            Ok(pages) => Secret(Storage::Pages(pages)),
            Err(_) => Secret(Storage::Heap(bytes)),
        }
    }

    /// The secret's bytes. Call only where the value is sent upstream or
    /// fed to the redactor.
    pub fn expose(&self) -> &[u8] {
        match &self.0 {
            Storage::Pages(pages) => pages.as_slice(),
            Storage::Heap(bytes) => bytes,
        }
    }

    /// Whether the secret's pages are locked in RAM (never swapped out).
    pub fn is_locked(&self) -> bool {
        matches!(&self.0, Storage::Pages(p) if p.is_locked())
    }

    /// The address range of the secret's own pages, if it has them.
    pub fn pages(&self) -> Option<std::ops::Range<usize>> {
        match &self.0 {
            Storage::Pages(pages) => Some(pages.range()),
            Storage::Heap(_) => None,
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Every configured credential, by name, plus the redactor for all of them.
#[derive(Debug, Default)]
pub struct Credentials {
    secrets: BTreeMap<String, Arc<Secret>>,
    /// Credentials whose value changes at runtime (`kind = "oauth2"`).
    oauth: BTreeMap<String, Arc<oauth::OAuth2Credential>>,
    /// `(credential, user)` pairs used with HTTP Basic auth; the redactor
    /// also covers `user:secret` for each.
    basic_users: BTreeSet<(String, String)>,
    /// The redactor and the leak scanner for every value held now.
    coverage: Arc<Coverage>,
    /// `kind = "aws"` credentials: the public half of each key (the
    /// secret access key is the credential's secret).
    aws: BTreeMap<String, aws::AwsKey>,
}

/// What a credential is doing, for `keyward-broker status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialState {
    /// Usable (a static secret, or a token credential between refreshes).
    Loaded,
    /// A token refresh is in flight.
    Refreshing,
    /// Unusable until the admin acts; the reason says what to do.
    Broken(String),
}

/// The value a tool injects now, and which generation of a token
/// credential it is (for [`Credentials::rejected`]).
#[derive(Debug, Clone)]
pub struct Current {
    pub secret: Arc<Secret>,
    generation: Option<u64>,
}

/// What redaction and the leak scanner cover: every credential's values,
/// by credential, and the Basic pairs (redacted, not scanned: their user
/// part is public). A token credential replaces its values when it gets
/// new tokens; both are rebuilt and swapped in before the new values are
/// used, and calls in flight keep the ones they started with.
#[derive(Default)]
pub struct Coverage {
    values: Mutex<CoveredValues>,
    current: RwLock<(Arc<Redactor>, Arc<LeakScanner>)>,
}

#[derive(Default)]
struct CoveredValues {
    secrets: BTreeMap<String, Vec<Arc<Secret>>>,
    pairs: Vec<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coverage").finish_non_exhaustive()
    }
}

impl Coverage {
    /// The redactor for every value covered now.
    pub fn redactor(&self) -> Arc<Redactor> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()).0)
    }

    /// The leak scanner for every value covered now.
    pub fn scanner(&self) -> Arc<LeakScanner> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()).1)
    }

    /// Cover exactly `values` for `credential` from now on.
    pub fn set(&self, credential: &str, values: Vec<Arc<Secret>>) -> Result<(), CredentialError> {
        let mut covered = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let old = covered.secrets.insert(credential.to_owned(), values);
        if let Err(e) = self.rebuild(&covered) {
            match old {
                Some(old) => covered.secrets.insert(credential.to_owned(), old),
                None => covered.secrets.remove(credential),
            };
            return Err(e);
        }
        Ok(())
    }

    fn add_pair(&self, pair: Zeroizing<Vec<u8>>) -> Result<(), CredentialError> {
        let mut covered = self.values.lock().unwrap_or_else(|p| p.into_inner());
        covered.pairs.push(pair);
        if let Err(e) = self.rebuild(&covered) {
            covered.pairs.pop();
            return Err(e);
        }
        Ok(())
    }

    fn rebuild(&self, covered: &CoveredValues) -> Result<(), CredentialError> {
        let secrets = || covered.secrets.values().flatten().map(|s| s.expose());
        let scanner = LeakScanner::new(secrets())?;
        let redactor = Redactor::new(secrets().chain(covered.pairs.iter().map(|p| p.as_slice())))?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
            (Arc::new(redactor), Arc::new(scanner));
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "no credential directory: neither $CREDENTIALS_DIRECTORY nor broker.credentials_dir is set"
    )]
    NoDirectory,
    #[error("credential directory {path}: {message}")]
    Directory { path: PathBuf, message: String },
    #[error("credential directory {path} {who}; only the broker (and root) may read it: {fix}")]
    DirectoryMode {
        path: PathBuf,
        who: String,
        fix: String,
    },
    #[error("credential directory {path}: {source}")]
    DirectoryStat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("credential {name}: cannot open {path}: {source}")]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("credential {name}: cannot read {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("credential {name}: {path}: {message}")]
    File {
        name: String,
        path: PathBuf,
        message: String,
    },
    #[error("credential {name}: {message}")]
    Invalid { name: String, message: String },
    #[error("cannot build the credential redactor: {0}")]
    Redactor(#[from] RedactError),
    #[error(transparent)]
    Scanner(#[from] LeakError),
    #[error(transparent)]
    OAuth(#[from] oauth::OAuthError),
}

impl Credentials {
    /// The directory to load credentials from: `$CREDENTIALS_DIRECTORY`
    /// when systemd set it, else the configured one.
    pub fn directory(configured: Option<&Path>) -> Result<PathBuf, CredentialError> {
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
            _ => configured
                .map(Path::to_path_buf)
                .ok_or(CredentialError::NoDirectory),
        }
    }

    /// Load each `(name, file)` from `dir`; `file` is relative to `dir`.
    pub fn load<N, F>(
        dir: &Path,
        wanted: impl IntoIterator<Item = (N, F)>,
    ) -> Result<Credentials, CredentialError>
    where
        N: Into<String>,
        F: AsRef<Path>,
    {
        check_directory(dir)?;
        let mut secrets = BTreeMap::new();
        for (name, file) in wanted {
            let name = name.into();
            let file = file.as_ref();
            let path = dir.join(file);
            if !is_plain_relative(file) {
                return Err(CredentialError::File {
                    name,
                    path,
                    message:
                        "the file name must be relative to the credential directory, without `..`"
                            .to_owned(),
                });
            }
            let secret = read_secret(&name, &path)?;
            secrets.insert(name, secret);
        }
        Credentials::from_secrets(secrets)
    }

    /// Build from values already in memory. For tests: it skips every
    /// file check, and the minimum length.
    #[cfg(test)]
    pub(crate) fn from_values<N, V>(
        values: impl IntoIterator<Item = (N, V)>,
    ) -> Result<Credentials, CredentialError>
    where
        N: Into<String>,
        V: AsRef<[u8]>,
    {
        let secrets = values
            .into_iter()
            .map(|(n, v)| (n.into(), Secret::new(Zeroizing::new(v.as_ref().to_vec()))))
            .collect();
        Credentials::from_secrets(secrets)
    }

    fn from_secrets(secrets: BTreeMap<String, Secret>) -> Result<Credentials, CredentialError> {
        let coverage = Arc::new(Coverage::default());
        let mut stored = BTreeMap::new();
        for (name, secret) in secrets {
            let secret = Arc::new(secret);
            coverage.set(&name, vec![Arc::clone(&secret)])?;
            stored.insert(name, secret);
        }
        Ok(Credentials {
            secrets: stored,
            oauth: BTreeMap::new(),
            basic_users: BTreeSet::new(),
            aws: BTreeMap::new(),
            coverage,
        })
    }

    /// Add a token credential (its values are already covered).
    fn add_oauth(&mut self, credential: oauth::OAuth2Credential) {
        self.oauth
            .insert(credential.name().to_owned(), Arc::new(credential));
    }

    /// Tell the redactor that `credential` is also sent as HTTP Basic
    /// `user:secret`, so the exact encodings of that string are redacted
    /// too (the secret alone is always covered).
    pub fn register_basic_user(
        &mut self,
        credential: &str,
        user: &str,
    ) -> Result<(), CredentialError> {
        if self.oauth.contains_key(credential) {
            return Err(CredentialError::Invalid {
                name: credential.to_owned(),
                message: "is an oauth2 credential: send its access token with \
                          auth = { bearer = true } or { header = \"NAME\" }, not as HTTP Basic"
                    .to_owned(),
            });
        }
        let Some(secret) = self.secrets.get(credential) else {
            return Err(CredentialError::Invalid {
                name: credential.to_owned(),
                message: "is not loaded".to_owned(),
            });
        };
        if !self.has_basic_user(credential, user) {
            self.coverage.add_pair(basic_pair(user, secret))?;
            self.basic_users
                .insert((credential.to_owned(), user.to_owned()));
        }
        Ok(())
    }

    /// Whether [`Credentials::register_basic_user`] was called for this pair.
    pub fn has_basic_user(&self, credential: &str, user: &str) -> bool {
        self.basic_users
            .contains(&(credential.to_owned(), user.to_owned()))
    }

    /// Record that the loaded credential `name` is an AWS key.
    pub fn register_aws(&mut self, name: &str, key: aws::AwsKey) -> Result<(), CredentialError> {
        if !self.secrets.contains_key(name) {
            return Err(CredentialError::Invalid {
                name: name.to_owned(),
                message: "is not loaded".to_owned(),
            });
        }
        self.aws.insert(name.to_owned(), key);
        Ok(())
    }

    /// An AWS credential by name: its public half and its secret key.
    pub fn aws(&self, name: &str) -> Option<(&aws::AwsKey, &Secret)> {
        Some((self.aws.get(name)?, self.secrets.get(name)?))
    }

    /// A static credential by name (token credentials have no fixed
    /// value: see [`Credentials::current`]).
    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.secrets.get(name).map(|s| &**s)
    }

    /// Whether a credential of any kind is loaded under this name.
    pub fn contains(&self, name: &str) -> bool {
        self.secrets.contains_key(name) || self.oauth.contains_key(name)
    }

    /// A token credential by name.
    pub fn oauth(&self, name: &str) -> Option<&Arc<oauth::OAuth2Credential>> {
        self.oauth.get(name)
    }

    /// What the credential is doing now; `None` if none has this name.
    pub fn state(&self, name: &str) -> Option<CredentialState> {
        match self.oauth.get(name) {
            Some(credential) => Some(credential.state()),
            None => self
                .secrets
                .contains_key(name)
                .then_some(CredentialState::Loaded),
        }
    }

    /// Every credential and what it is doing now, by name.
    pub fn states(&self) -> Vec<(String, CredentialState)> {
        self.names()
            .filter_map(|name| Some((name.to_owned(), self.state(name)?)))
            .collect()
    }

    /// The value to inject for `name` now: a static secret, or a token
    /// credential's current access token (refreshed first if it is due).
    pub async fn current(&self, name: &str) -> Result<Current, CredentialError> {
        if let Some(credential) = self.oauth.get(name) {
            let token = credential.access_token().await?;
            return Ok(Current {
                secret: token.secret,
                generation: Some(token.generation),
            });
        }
        match self.secrets.get(name) {
            Some(secret) => Ok(Current {
                secret: Arc::clone(secret),
                generation: None,
            }),
            None => Err(CredentialError::Invalid {
                name: name.to_owned(),
                message: "is not loaded".to_owned(),
            }),
        }
    }

    /// The upstream refused `current` as unauthorized (HTTP 401): a token
    /// credential refreshes (once, however many calls report the same
    /// token) and returns the new value to retry with; `None` when there
    /// is nothing to retry with (a static secret, or a token too fresh to
    /// blame).
    pub async fn rejected(
        &self,
        name: &str,
        current: &Current,
    ) -> Result<Option<Current>, CredentialError> {
        let (Some(credential), Some(generation)) = (self.oauth.get(name), current.generation)
        else {
            return Ok(None);
        };
        Ok(credential.rejected(generation).await?.map(|token| Current {
            secret: token.secret,
            generation: Some(token.generation),
        }))
    }

    /// After a reload: every broken token credential whose configured
    /// refresh token the admin replaced takes the new one and is usable
    /// again. One line per credential still broken or repaired.
    pub fn reauthorize(&self) -> Vec<String> {
        self.oauth
            .values()
            .filter_map(|credential| credential.reauthorize())
            .collect()
    }

    /// The redactor covering every value held now and every registered
    /// Basic pair.
    pub fn redactor(&self) -> Arc<Redactor> {
        self.coverage.redactor()
    }

    /// The leak scanner covering every value held now.
    pub fn scanner(&self) -> Arc<LeakScanner> {
        self.coverage.scanner()
    }

    /// The names of the loaded credentials.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let mut names: Vec<&str> = self
            .secrets
            .keys()
            .chain(self.oauth.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names.into_iter()
    }
}

/// `user:secret`, the text HTTP Basic auth base64-encodes.
pub fn basic_pair(user: &str, secret: &Secret) -> Zeroizing<Vec<u8>> {
    let mut pair = Zeroizing::new(Vec::with_capacity(user.len() + 1 + secret.expose().len()));
    pair.extend_from_slice(user.as_bytes());
    pair.push(b':');
    pair.extend_from_slice(secret.expose());
    pair
}

fn is_plain_relative(file: &Path) -> bool {
    let mut components = file.components().peekable();
    components.peek().is_some() && components.all(|c| matches!(c, Component::Normal(_)))
}

/// The directory must be a directory that neither group nor others can
/// read, write or search.
/// The directory must be one only the broker (and root) can list or
/// change: by its mode, or by its ACL where it has one (as systemd's
/// credential directories do).
fn check_directory(dir: &Path) -> Result<(), CredentialError> {
    let stat_error = |source| CredentialError::DirectoryStat {
        path: dir.to_owned(),
        source,
    };
    let meta = std::fs::metadata(dir).map_err(stat_error)?;
    if !meta.is_dir() {
        return Err(CredentialError::Directory {
            path: dir.to_owned(),
            message: "is not a directory".to_owned(),
        });
    }
    let handle = File::open(dir).map_err(stat_error)?;
    let meta = handle.metadata().map_err(stat_error)?;
    if let Some(who) = access::others_with_access(&handle, &meta, access::READ | access::WRITE) {
        return Err(CredentialError::DirectoryMode {
            path: dir.to_owned(),
            who,
            fix: access::remedy(&meta, "0700"),
        });
    }
    Ok(())
}

/// Open without following a symlink and without blocking on a FIFO, check
/// the opened file itself, and read it into a buffer sized once, so no
/// reallocation leaves an unzeroized copy behind.
fn read_secret(name: &str, path: &Path) -> Result<Secret, CredentialError> {
    let file_error = |message: String| CredentialError::File {
        name: name.to_owned(),
        path: path.to_owned(),
        message,
    };
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                file_error("is a symbolic link; refusing to follow it".to_owned())
            } else {
                CredentialError::Open {
                    name: name.to_owned(),
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    let read_error = |source| CredentialError::Read {
        name: name.to_owned(),
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(read_error)?;
    if !meta.file_type().is_file() {
        return Err(file_error("is not a regular file".to_owned()));
    }
    let all = access::READ | access::WRITE | access::EXECUTE;
    if let Some(who) = access::others_with_access(&file, &meta, all) {
        return Err(file_error(format!(
            "{who}; {}",
            access::remedy(&meta, "0600")
        )));
    }
    let size = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    if size > MAX_SECRET_LEN {
        return Err(file_error(format!("is larger than {MAX_SECRET_LEN} bytes")));
    }
    // One byte more than the file's size, so a file that grew since the
    // stat shows up as a full buffer instead of a reallocation.
    let mut buf = Zeroizing::new(vec![0u8; size + 1]);
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(e)),
        }
    }
    if filled > size {
        return Err(file_error("changed while being read".to_owned()));
    }
    buf.truncate(filled);
    if buf.is_empty() {
        return Err(file_error("is empty".to_owned()));
    }
    trim_one_newline(&mut buf);
    if buf.len() < MIN_SECRET_LEN {
        return Err(file_error(format!(
            "holds fewer than {MIN_SECRET_LEN} bytes: too short to redact reliably"
        )));
    }
    Ok(Secret::new(buf))
}

/// Drop one trailing `"\n"` or `"\r\n"` (what `echo` and editors add).
/// `truncate` keeps the capacity, which `Zeroizing` still wipes.
fn trim_one_newline(buf: &mut Zeroizing<Vec<u8>>) {
    if buf.ends_with(b"\r\n") {
        let len = buf.len() - 2;
        buf.truncate(len);
    } else if buf.ends_with(b"\n") {
        let len = buf.len() - 1;
        buf.truncate(len);
    }
}

/// Load every credential the configuration names, from
/// `$CREDENTIALS_DIRECTORY` or the configured `credentials_dir`, and
/// register the Basic-auth `(credential, user)` pairs the tools send
/// (`Policy::basic_users`) with the redactor.
pub fn load_for<'a>(
    source: &crate::config::Source,
    basic_users: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Credentials, CredentialError> {
    if source.config.credentials.is_empty() {
        return Ok(Credentials::default());
    }
    let dir = Credentials::directory(source.config.broker.credentials_dir.as_deref())?;
    let wanted = source
        .config
        .credentials
        .iter()
        .filter_map(|(name, c)| Some((name.clone(), c.get_ref().secret_file()?.to_path_buf())));
    let mut credentials = Credentials::load(&dir, wanted)?;
    let state_dir = crate::state::directory(source.config.broker.state_dir.as_deref());
    for (name, entry) in &source.config.credentials {
        let config = entry.get_ref();
        if config.kind.as_deref() == Some(oauth::KIND) {
            let loaded = oauth::OAuth2Credential::load(
                name,
                config,
                &dir,
                state_dir.as_deref(),
                Arc::clone(&credentials.coverage),
            )?;
            credentials.add_oauth(loaded);
        }
    }
    for (credential, user) in basic_users {
        credentials.register_basic_user(credential, user)?;
    }
    for (name, c) in &source.config.credentials {
        if let Some(key) = aws::AwsKey::from_config(c.get_ref()) {
            credentials.register_aws(name, key)?;
        }
    }
    Ok(credentials)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const VALUE: &str = "s3cr3t-V4lue-0123";

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    fn write(dir: &Path, file: &str, content: &[u8], mode: u32) {
        let path = dir.join(file);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn load_one(dir: &Path, file: &str) -> Result<Credentials, CredentialError> {
        Credentials::load(dir, [("api", file)])
    }

    #[test]
    fn loads_and_trims_one_newline() {
        let dir = private_dir();
        write(dir.path(), "a", format!("{VALUE}\n").as_bytes(), 0o600);
        write(dir.path(), "b", format!("{VALUE}\r\n").as_bytes(), 0o400);
        write(dir.path(), "c", format!("{VALUE}\n\n").as_bytes(), 0o600);
        let creds = Credentials::load(dir.path(), [("a", "a"), ("b", "b"), ("c", "c")]).unwrap();
        assert_eq!(creds.get("a").unwrap().expose(), VALUE.as_bytes());
        assert_eq!(creds.get("b").unwrap().expose(), VALUE.as_bytes());
        assert_eq!(
            creds.get("c").unwrap().expose(),
            format!("{VALUE}\n").as_bytes()
        );
        assert_eq!(creds.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(creds.get("d").is_none());
        assert_eq!(
            creds.redactor().redact_str(&format!("x{VALUE}y")),
            "x[REDACTED]y"
        );
    }

    #[test]
    fn secrets_live_in_locked_pages_excluded_from_core_dumps() {
        let dir = private_dir();
        write(dir.path(), "a", VALUE.as_bytes(), 0o600);
        let creds = load_one(dir.path(), "a").unwrap();
        let secret = creds.get("api").unwrap();
        assert_eq!(secret.expose(), VALUE.as_bytes());
        let range = secret.pages().expect("the secret has pages of its own");
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // The entry whose range contains the secret's pages (the kernel may
        // merge neighbouring mappings with the same flags), up to its
        // VmFlags line.
        let contains = |line: &str| {
            let Some((start, rest)) = line.split_once('-') else {
                return false;
            };
            let end = rest.split(' ').next().unwrap_or_default();
            match (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                (Ok(start), Ok(end)) => start <= range.start && range.end <= end,
                _ => false,
            }
        };
        let flags = smaps
            .lines()
            .skip_while(|l| !contains(l))
            .find(|l| l.starts_with("VmFlags:"))
            .unwrap_or_else(|| panic!("no mapping for {range:x?} in smaps"));
        assert!(flags.contains(" dd"), "not MADV_DONTDUMP: {flags}");
        if secret.is_locked() {
            assert!(flags.contains(" lo"), "not mlocked: {flags}");
        }
    }

    #[test]
    fn debug_never_shows_the_value() {
        let dir = private_dir();
        write(dir.path(), "a", VALUE.as_bytes(), 0o600);
        let creds = load_one(dir.path(), "a").unwrap();
        let debug = format!("{creds:?} {:?}", creds.get("api").unwrap());
        assert!(!debug.contains(VALUE), "{debug}");
        assert!(debug.contains("[redacted]"), "{debug}");
    }

    #[test]
    fn refuses_an_open_directory() {
        let dir = private_dir();
        write(dir.path(), "a", VALUE.as_bytes(), 0o600);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = load_one(dir.path(), "a").unwrap_err().to_string();
        assert!(err.contains("accessible to anyone (mode 0755)"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn refuses_an_accessible_file() {
        let dir = private_dir();
        write(dir.path(), "a", VALUE.as_bytes(), 0o640);
        let err = load_one(dir.path(), "a").unwrap_err().to_string();
        assert!(err.contains("credential api"), "{err}");
        assert!(err.contains("mode 0640"), "{err}");
        assert!(!err.contains(VALUE), "{err}");
    }

    /// A file or directory of the wrong owner is fixed with `chown`; a
    /// mode with `chmod`. (Runs as root, as the suite does: the foreign
    /// owner is an unprivileged uid.)
    #[test]
    fn wrong_owner_says_chown_and_wrong_mode_says_chmod() {
        let dir = private_dir();
        write(dir.path(), "a", VALUE.as_bytes(), 0o640);
        let err = load_one(dir.path(), "a")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod 0600"), "{err}");
        assert!(!err.contains("chown"), "{err}");
        let dir = private_dir();
        write(dir.path(), "a", VALUE.as_bytes(), 0o600);
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: cannot give a file a foreign owner; skipped");
            return;
        }
        std::os::unix::fs::chown(dir.path().join("a"), Some(61234), None).unwrap();
        let err = load_one(dir.path(), "a").unwrap_err().to_string();
        assert!(err.contains("owned by uid 61234"), "{err}");
        assert!(err.contains("chown"), "{err}");
        assert!(!err.contains("chmod"), "{err}");
        std::os::unix::fs::chown(dir.path().join("a"), Some(0), None).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(61234), None).unwrap();
        let err = load_one(dir.path(), "a").unwrap_err().to_string();
        assert!(err.contains("credential directory"), "{err}");
        assert!(err.contains("chown"), "{err}");
        assert!(!err.contains("chmod"), "{err}");
    }

    #[test]
    fn refuses_a_symlink_and_a_directory() {
        let dir = private_dir();
        write(dir.path(), "real", VALUE.as_bytes(), 0o600);
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let err = load_one(dir.path(), "link").unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::set_permissions(
            dir.path().join("sub"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let err = load_one(dir.path(), "sub").unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn refuses_a_fifo_without_blocking() {
        let dir = private_dir();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = load_one(dir.path(), "fifo").unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn refuses_empty_and_short_values() {
        let dir = private_dir();
        write(dir.path(), "empty", b"", 0o600);
        write(dir.path(), "short", b"1234567\n", 0o600);
        write(dir.path(), "eight", b"12345678\n", 0o600);
        let err = load_one(dir.path(), "empty").unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        let err = load_one(dir.path(), "short").unwrap_err().to_string();
        assert!(err.contains("too short to redact reliably"), "{err}");
        assert!(!err.contains("1234567"), "{err}");
        load_one(dir.path(), "eight").unwrap();
    }

    #[test]
    fn refuses_escaping_file_names_and_missing_files() {
        let dir = private_dir();
        let err = load_one(dir.path(), "../etc/passwd")
            .unwrap_err()
            .to_string();
        assert!(err.contains("relative"), "{err}");
        let err = load_one(dir.path(), "/etc/passwd").unwrap_err().to_string();
        assert!(err.contains("relative"), "{err}");
        let err = load_one(dir.path(), "missing").unwrap_err().to_string();
        assert!(err.contains("credential api: cannot open"), "{err}");
    }

    #[test]
    fn directory_prefers_systemd() {
        // The only test touching this variable.
        std::env::remove_var("CREDENTIALS_DIRECTORY");
        assert!(matches!(
            Credentials::directory(None),
            Err(CredentialError::NoDirectory)
        ));
        assert_eq!(
            Credentials::directory(Some(Path::new("/etc/k"))).unwrap(),
            Path::new("/etc/k")
        );
        std::env::set_var("CREDENTIALS_DIRECTORY", "/run/credentials/k.service");
        let picked = Credentials::directory(Some(Path::new("/etc/k")));
        std::env::remove_var("CREDENTIALS_DIRECTORY");
        assert_eq!(picked.unwrap(), Path::new("/run/credentials/k.service"));
    }

    #[tokio::test]
    async fn static_credentials_are_loaded_and_current() {
        let creds = Credentials::from_values([("api", VALUE)]).unwrap();
        assert_eq!(
            creds.states(),
            vec![("api".to_owned(), CredentialState::Loaded)]
        );
        assert!(creds.state("nope").is_none());
        assert!(creds.contains("api") && !creds.contains("nope"));
        let current = creds.current("api").await.unwrap();
        assert_eq!(current.secret.expose(), VALUE.as_bytes());
        // A static secret has nothing to refresh on a 401.
        assert!(creds.rejected("api", &current).await.unwrap().is_none());
        let err = creds.current("nope").await.unwrap_err().to_string();
        assert_eq!(err, "credential nope: is not loaded");
    }

    #[test]
    fn basic_pair_is_redacted_once_registered() {
        use base64::Engine as _;
        let mut creds = Credentials::from_values([("api", VALUE)]).unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("bob:{VALUE}"));
        assert!(!creds.has_basic_user("api", "bob"));
        creds.register_basic_user("api", "bob").unwrap();
        assert!(creds.has_basic_user("api", "bob"));
        assert_eq!(
            creds.redactor().redact_str(&format!("Basic {encoded}")),
            "Basic [REDACTED]"
        );
        assert!(creds.register_basic_user("nope", "bob").is_err());
    }
}
