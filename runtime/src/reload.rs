//! Live configuration reload: SIGHUP and file changes trigger it; a new file is validated in full
//! and either applied whole or rejected whole.
//!
//! [`watch`] turns both triggers into calls of one `reload` function, which the agent and the
//! gateway implement: parse and validate the whole text, then swap the parts that can change live
//! (policies and routes, behind `arc-swap`), so requests in flight finish under the config they
//! started with and no connection is touched. TLS material (certificates, keys, CA bundles) is
//! re-read too and, when it changed, used for every new handshake: connections already made keep
//! theirs, so a rotation needs no restart. Parts bound at start (listen addresses, the gateway
//! address, queues, the archive) are compared and, when they differ, named in a warning: they
//! take effect at the next restart.
//!
//! The configuration file and the TLS files it names are watched, by their directories rather
//! than the files themselves: editors and Kubernetes volumes replace a file by renaming another
//! over it (a ConfigMap or Secret volume swaps a `..data` symlink), which a watch on the old inode
//! would miss. Events are debounced, and a file whose bytes did
//! not change since the last attempt is not reloaded again (so one edit followed by a SIGHUP is
//! one reload, and a rejected file is not rejected twice).
//!
//! [`ConfigState`] keeps what `GET /config` shows: the document in force (with secret-looking
//! values masked), its version, when and where it was loaded, and counts reloads in
//! `teeway_config_reload_total{result="applied|rejected"}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use metrics::{Counter, Gauge};
use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Registry;
use crate::yaml::Value;

/// Reloads, by result.
pub const RELOAD_TOTAL: &str = "teeway_config_reload_total";
/// Version of the configuration in force: 1 at start, one more per applied reload.
pub const CONFIG_VERSION: &str = "teeway_config_version";

/// Quiet time after a file event before the file is read (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Keys whose values `GET /config` never shows.
const SECRET_KEYS: [&str; 5] = ["secret", "password", "token", "hash_key", "private"];
/// Keys that hold header names and values (`set_headers`, a matcher's `headers`): the values of
/// credential-like names among them are masked.
const HEADER_MAPS: [&str; 2] = ["set_headers", "headers"];
/// Words that make a header name credential-like: any name containing one is masked.
const CREDENTIAL_WORDS: [&str; 9] = [
    "auth",
    "cookie",
    "token",
    "secret",
    "pass",
    "key",
    "session",
    "credential",
    "signature",
];

/// The configuration in force, for `GET /config`, and the reload counters.
pub struct ConfigState {
    current: Mutex<Current>,
    applied: Counter,
    rejected: Counter,
    version: Gauge,
}

struct Current {
    version: u64,
    loaded_at: SystemTime,
    source: String,
    document: Option<Value>,
    /// The document the process started with: settings bound at start come from it.
    started_with: Option<Value>,
    /// Settings changed by a reload that take effect at the next restart.
    pending_restart: Vec<String>,
    last_error: Option<String>,
}

impl std::fmt::Debug for ConfigState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigState").finish_non_exhaustive()
    }
}

impl ConfigState {
    /// Version 1 of a configuration read from `source` (a path, or a description such as
    /// `built in`), whose YAML `text` is shown on `/config` when given.
    pub fn new(registry: &Registry, source: &str, text: Option<&str>) -> Self {
        let counter = |result| {
            registry.counter(
                RELOAD_TOTAL,
                "Configuration reloads, by result (rejected: the old configuration stayed)",
                &[("result", result)],
            )
        };
        let version = registry.gauge(
            CONFIG_VERSION,
            "Version of the configuration in force (1 at start, +1 per applied reload)",
            &[],
        );
        version.set(1.0);
        Self {
            current: Mutex::new(Current {
                version: 1,
                loaded_at: SystemTime::now(),
                source: source.to_owned(),
                document: text.and_then(|t| crate::yaml::parse(t).ok()),
                started_with: text.and_then(|t| crate::yaml::parse(t).ok()),
                pending_restart: Vec::new(),
                last_error: None,
            }),
            applied: counter("applied"),
            rejected: counter("rejected"),
            version,
        }
    }

    /// Records an applied reload of `text`, of which the settings `restart` (dotted paths such
    /// as `listen`, `admin.listen`) wait for the next restart; returns the new version.
    pub fn applied(&self, text: &str, restart: &[String]) -> u64 {
        let mut c = self.lock();
        c.version += 1;
        c.loaded_at = SystemTime::now();
        c.document = crate::yaml::parse(text).ok();
        c.pending_restart = restart.to_vec();
        c.last_error = None;
        self.applied.increment(1);
        self.version.set(c.version as f64);
        c.version
    }

    /// Records a rejected reload; the configuration in force is unchanged.
    pub fn rejected(&self, error: &str) {
        // The error quotes values found in the file: a URL's password among them.
        self.lock().last_error =
            Some(without_url_password(error).unwrap_or_else(|| error.to_owned()));
        self.rejected.increment(1);
    }

    /// The version in force.
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// The `GET /config` body: JSON with `version`, `loaded_at` (Unix seconds), `source`,
    /// `last_rejected` (the error of the last rejected reload since the last applied one),
    /// `config` (what is in force: the last applied document, where settings bound at start
    /// keep the values the process started with) and `pending_restart` (those settings' new
    /// values, in force after the next restart). Secrets, credential-like header values and
    /// URL passwords are masked.
    pub fn render(&self) -> String {
        let c = self.lock();
        let json = |d: &Option<Value>| {
            d.as_ref()
                .and_then(|d| serde_json::to_value(d).ok())
                .unwrap_or(serde_json::Value::Null)
        };
        let mut document = json(&c.document);
        let started_with = json(&c.started_with);
        let mut pending = serde_json::Map::new();
        for setting in &c.pending_restart {
            let path: Vec<&str> = setting.split('.').collect();
            let next = take_at(&mut document, &path);
            if let Some(old) = value_at(&started_with, &path) {
                put_at(&mut document, &path, old.clone());
            }
            pending.insert(setting.clone(), next.unwrap_or(serde_json::Value::Null));
        }
        let mut pending = serde_json::Value::Object(pending);
        mask_secrets(&mut document);
        mask_secrets(&mut pending);
        let body = serde_json::json!({
            "version": c.version,
            "loaded_at": c.loaded_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "source": c.source,
            "last_rejected": c.last_error,
            "config": document,
            "pending_restart": pending,
        });
        serde_json::to_string_pretty(&body).unwrap_or_else(|_| "{}".into())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        // A panic while holding the lock leaves plain data behind: keep serving it.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn value_at<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a serde_json::Value> {
    path.iter().try_fold(v, |v, key| v.get(key))
}

/// Removes and returns the value at `path`.
fn take_at(v: &mut serde_json::Value, path: &[&str]) -> Option<serde_json::Value> {
    let (last, parents) = path.split_last()?;
    let mut at = v;
    for key in parents {
        at = at.get_mut(key)?;
    }
    at.as_object_mut()?.remove(*last)
}

/// Sets the value at `path`, making the mappings on the way.
fn put_at(v: &mut serde_json::Value, path: &[&str], value: serde_json::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = v;
    for key in parents {
        let Some(map) = at.as_object_mut() else {
            return;
        };
        at = map
            .entry((*key).to_owned())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
    if let Some(map) = at.as_object_mut() {
        map.insert((*last).to_owned(), value);
    }
}

const MASKED: &str = "(masked)";

fn mask_secrets(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                if SECRET_KEYS.iter().any(|s| k.contains(s)) && !k.ends_with("_file") {
                    *v = serde_json::Value::String(MASKED.into());
                } else if HEADER_MAPS.contains(&k.as_str()) {
                    mask_credential_headers(v);
                } else {
                    mask_secrets(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        serde_json::Value::String(text) => {
            if let Some(masked) = without_url_password(text) {
                *text = masked;
            }
        }
        _ => {}
    }
}

/// Whether a header name is credential-like (`authorization`, `set-cookie`, `x-api-key`...):
/// its values are never shown.
pub fn credential_like(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    CREDENTIAL_WORDS.iter().any(|w| name.contains(w))
}

/// In a header map, the values of credential-like names (`authorization`, `x-api-key`...).
fn mask_credential_headers(v: &mut serde_json::Value) {
    let serde_json::Value::Object(map) = v else {
        return mask_secrets(v);
    };
    for (name, value) in map.iter_mut() {
        if credential_like(name) {
            // Whatever its YAML type: `x-api-key: 9876543210` is a number to YAML.
            *value = serde_json::Value::String(MASKED.into());
        } else {
            mask_secrets(value);
        }
    }
}

/// `text` with the userinfo of every URL in it masked (`http://user:(masked)@host`, a token
/// alone as `https://(masked)@host`); `None` when there is none.
pub fn without_url_password(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| {
                matches!(c, '/' | '?' | '#') || c.is_whitespace() || c == '`' || c == '"'
            })
            .unwrap_or(after.len());
        match after[..end].rfind('@') {
            Some(userinfo_end) => {
                let userinfo = &after[..userinfo_end];
                match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:{MASKED}")),
                    None => out.push_str(MASKED),
                }
                out.push_str(&after[userinfo_end..end]);
                changed = true;
            }
            None => out.push_str(&after[..end]),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// What a reload function returns: `Ok` with the settings that need a restart (possibly none),
/// or the reason the new configuration was rejected.
pub type ReloadResult = Result<Vec<String>, String>;

/// Reloads `path` on SIGHUP and whenever it or one of `also_watched` (the TLS files it names)
/// changes, until `shutdown`, by calling `reload` with its text. Failures to read the file count
/// as rejections and are logged.
///
/// The set of `also_watched` files is fixed when the watch starts: a reload that names other
/// certificate files reads them, but their later changes need a SIGHUP until the next restart.
pub fn watch(
    path: PathBuf,
    also_watched: Vec<PathBuf>,
    state: Arc<ConfigState>,
    reload: impl Fn(&str) -> ReloadResult + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hangup = signal(SignalKind::hangup())?;
    let (events_tx, mut events) = mpsc::channel::<()>(1);
    let files: Vec<PathBuf> = std::iter::once(path.clone())
        .chain(also_watched.iter().cloned())
        .collect();
    let names: Vec<_> = files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        // Kubernetes volumes (ConfigMap, Secret) swap a `..data` symlink; editors rename a new
        // file over the old name. Either shows up as an event naming one of these.
        let relevant = event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n == "..data" || names.iter().any(|name| name == n))
        });
        if relevant {
            // A full channel already holds a pending reload.
            let _ = events_tx.try_send(());
        }
    })
    .map_err(std::io::Error::other)?;
    let mut dirs: Vec<PathBuf> = files.iter().map(|f| parent_dir(f)).collect();
    dirs.sort();
    dirs.dedup();
    for dir in &dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| std::io::Error::other(format!("cannot watch {}: {e}", dir.display())))?;
    }
    let mut last_seen = fingerprint(std::fs::read(&path).ok().as_deref(), &also_watched);
    Ok(tokio::spawn(async move {
        // Owned by the task: dropping it stops the watch.
        let _watcher = watcher;
        loop {
            let trigger = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = hangup.recv() => "SIGHUP",
                Some(()) = events.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while events.try_recv().is_ok() {}
                    "file change"
                }
            };
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    let error = format!("cannot read {}: {e}", path.display());
                    tracing::warn!(%trigger, %error, "configuration reload rejected; the configuration in force stays");
                    state.rejected(&error);
                    continue;
                }
            };
            // The same bytes again (a watcher event and a SIGHUP for one edit, or an editor's
            // touch) would only repeat the last verdict. The configuration's part of the
            // fingerprint is the very text reloaded: read twice, a write landing in between
            // would be recorded as seen without ever being applied. (TLS files are read again
            // by the reload, never older than here: a later change triggers another reload.)
            let seen = fingerprint(Some(&bytes), &also_watched);
            if seen == last_seen {
                tracing::info!(%trigger, "configuration and certificate files unchanged; nothing to reload");
                continue;
            }
            last_seen = seen;
            let text = String::from_utf8_lossy(&bytes);
            match reload(&text) {
                Ok(restart) => {
                    let version = state.applied(&text, &restart);
                    tracing::info!(%trigger, version, "configuration reloaded");
                    if !restart.is_empty() {
                        tracing::warn!(
                            settings = %restart.join(", "),
                            "changed settings take effect at the next restart; the rest is in force"
                        );
                    }
                }
                Err(error) => {
                    tracing::warn!(%trigger, %error, "configuration reload rejected; the configuration in force stays");
                    state.rejected(&error);
                }
            }
        }
    }))
}

/// The directory holding `file` (`.` for a bare name).
fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The configuration's bytes and those of every other watched file (an unreadable one as
/// `None`), to tell a real change from a repeated event.
fn fingerprint(config: Option<&[u8]>, also_watched: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    std::iter::once(config.map(<[u8]>::to_vec))
        .chain(also_watched.iter().map(|f| std::fs::read(f).ok()))
        .collect()
}

/// The display name of a configuration file, for `/config`.
pub fn source_name(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Snapshot;

    #[test]
    fn versions_count_and_secrets_are_masked() {
        let registry = Registry::new();
        let state = ConfigState::new(
            &registry,
            "agent.yaml",
            Some("mirror: { percentage: 5 }\nredact: { hash_key: abc, hash_key_file: k }\n"),
        );
        let shown: serde_json::Value = serde_json::from_str(&state.render()).expect("json");
        assert_eq!(shown["version"], 1);
        assert_eq!(shown["config"]["mirror"]["percentage"], 5);
        assert_eq!(shown["config"]["redact"]["hash_key"], "(masked)");
        assert_eq!(shown["config"]["redact"]["hash_key_file"], "k");
        state.rejected("bad");
        assert_eq!(state.applied("mirror: { percentage: 6 }\n", &[]), 2);
        let shown: serde_json::Value = serde_json::from_str(&state.render()).expect("json");
        assert_eq!(shown["config"]["mirror"]["percentage"], 6);
        assert!(shown["last_rejected"].is_null());
        let m = Snapshot::parse(&registry.render());
        assert_eq!(m.get("teeway_config_reload_total{result=\"applied\"}"), 1.0);
        assert_eq!(
            m.get("teeway_config_reload_total{result=\"rejected\"}"),
            1.0
        );
        assert_eq!(m.get(CONFIG_VERSION), 2.0);
    }

    #[test]
    fn credential_headers_and_url_passwords_are_masked_and_restart_settings_shown_pending() {
        let registry = Registry::new();
        let start = "listen: 127.0.0.1:4433\nadmin: { listen: 127.0.0.1:9902 }\nroutes:\n  - targets: [http://u:hunter2@shadow:80]\n    set_headers: { authorization: Bearer abc, x-api-key: 9876543210, x-env: shadow }\n    match: { headers: { cookie: 'session=s1' } }\n";
        let state = ConfigState::new(&registry, "gateway.yaml", Some(start));
        let shown: serde_json::Value = serde_json::from_str(&state.render()).expect("json");
        let route = &shown["config"]["routes"][0];
        assert_eq!(route["set_headers"]["authorization"], "(masked)");
        assert_eq!(route["set_headers"]["x-api-key"], "(masked)");
        assert_eq!(route["set_headers"]["x-env"], "shadow", "not a credential");
        assert_eq!(route["match"]["headers"]["cookie"], "(masked)");
        assert_eq!(route["targets"][0], "http://u:(masked)@shadow:80");
        assert!(!state.render().contains("hunter2"));
        assert_eq!(
            without_url_password("found `https://tok3n@h:1/x` and http://a:b@c").as_deref(),
            Some("found `https://(masked)@h:1/x` and http://a:(masked)@c")
        );
        state.rejected("primary: must not carry credentials (found `http://u:s3cret@p:80`)");
        assert!(!state.render().contains("s3cret"));

        let next = start
            .replace("listen: 127.0.0.1:4433", "listen: 127.0.0.1:5544")
            .replace("9902", "9903");
        state.applied(&next, &["listen".into(), "admin.listen".into()]);
        let shown: serde_json::Value = serde_json::from_str(&state.render()).expect("json");
        assert_eq!(
            shown["config"]["listen"], "127.0.0.1:4433",
            "still in force"
        );
        assert_eq!(shown["config"]["admin"]["listen"], "127.0.0.1:9902");
        assert_eq!(shown["pending_restart"]["listen"], "127.0.0.1:5544");
        assert_eq!(shown["pending_restart"]["admin.listen"], "127.0.0.1:9903");
    }
}
