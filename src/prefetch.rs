//! Prewarming: prefetch lists watched with notify, prefetch runs with progress events, pins,
//! and the background refresh of listed and pinned tags.
//!
//! A list file has one reference per line, an optional `pin` after it, and `#` comments; the
//! solo.io wasme `images.txt` format is a subset. Lists are re-read whenever their directory
//! changes (edits, atomic renames, and the `..data` symlink swaps kubelet uses for ConfigMaps),
//! debounced. This module decides *what* to fetch and when; `fetch` does the fetching and
//! `store` keeps the pins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::fetch::{self, error_chain, Fetched, Fetcher, PullPolicy};
use crate::reference::{self, Reference};
use crate::store::PinSource;

/// How often a download's progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// First retry delay for transient registry errors; doubles each time.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// Events buffered per prefetch run.
const EVENT_BUFFER: usize = 256;

/// One line of a prefetch list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The reference, normalised.
    pub reference: Reference,
    /// Whether the line says `pin`.
    pub pin: bool,
}

/// A line that could not be used, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Parses a prefetch list; bad lines are returned apart and the rest still load.
pub fn parse_list(text: &str, file: &Path) -> (Vec<Entry>, Vec<BadLine>) {
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let reference = words.next().expect("a non-empty line has a word");
        let pin = match (words.next(), words.next()) {
            (None, _) => false,
            (Some("pin"), None) => true,
            (Some(other), _) => {
                bad.push(BadLine {
                    file: file.to_owned(),
                    line: index + 1,
                    reason: format!(
                        "expected '<reference> [pin]', found '{other}' after the reference"
                    ),
                });
                continue;
            }
        };
        match reference.parse::<Reference>() {
            Ok(reference) => entries.push(Entry { reference, pin }),
            Err(error) => bad.push(BadLine {
                file: file.to_owned(),
                line: index + 1,
                reason: error.to_string(),
            }),
        }
    }
    (entries, bad)
}

/// Reads every list: each path is a file, or a directory whose visible files are lists
/// (entries starting with `.` are skipped, which leaves out a ConfigMap's `..data` internals).
/// Missing files are skipped with a log line: they may be about to come back.
pub fn load_lists(paths: &[PathBuf]) -> Vec<Entry> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let Ok(entries) = std::fs::read_dir(path) else {
                warn!(path = %path.display(), "cannot read prefetch directory");
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut entries: Vec<Entry> = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(error) => {
                warn!(file = %file.display(), %error, "cannot read prefetch list; skipped");
                continue;
            }
        };
        let (found, bad) = parse_list(&text, &file);
        for line in bad {
            warn!(file = %line.file.display(), line = line.line, reason = %line.reason, "bad prefetch line skipped");
        }
        for entry in found {
            match entries.iter_mut().find(|e| e.reference == entry.reference) {
                Some(existing) => existing.pin |= entry.pin,
                None => entries.push(entry),
            }
        }
    }
    entries
}

/// Why one reference of a prefetch failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reference does not parse.
    #[error(transparent)]
    Reference(#[from] reference::ParseError),
    /// The fetch failed (after retries, for transient errors).
    #[error(transparent)]
    Fetch(#[from] fetch::Error),
    /// The pin could not be recorded.
    #[error("pinning {reference}")]
    Pin {
        /// The reference.
        reference: String,
        /// The store error.
        #[source]
        source: crate::store::Error,
    },
}

/// What happens during a prefetch run, per reference and then once overall.
#[derive(Debug)]
pub enum Event {
    /// Waiting for a prefetch slot.
    Queued(String),
    /// Resolving at the registry (or answering from the cache).
    Resolving(String),
    /// Bytes received so far of the module's layer.
    Downloading {
        /// The reference.
        reference: String,
        /// Bytes received.
        done: u64,
        /// Layer size.
        total: u64,
    },
    /// Stored.
    Done {
        /// The reference as given.
        reference: String,
        /// What was fetched.
        fetched: Box<Fetched>,
    },
    /// Failed for good.
    Failed {
        /// The reference as given.
        reference: String,
        /// Why.
        error: Error,
    },
    /// Every reference has finished.
    Summary {
        /// How many were fetched.
        succeeded: u32,
        /// How many failed.
        failed: u32,
    },
}

/// Runs prefetches; cheap to clone.
#[derive(Clone)]
pub struct Prefetcher {
    fetcher: Fetcher,
    permits: Arc<Semaphore>,
    retries: u32,
    queue: Arc<Queue>,
}

/// References queued or running in prefetches started through the APIs, in all and by
/// client, against `limits.max_prefetch_queue` and `limits.max_prefetch_per_client`.
struct Queue {
    total_limit: usize,
    client_limit: usize,
    counts: std::sync::Mutex<(usize, std::collections::HashMap<String, usize>)>,
}

/// One reference's place in the [`Queue`]; given back when its prefetch ends.
struct QueueSlot {
    queue: Arc<Queue>,
    client: String,
}

impl Queue {
    /// Takes `count` places for `client`, or says which limit refuses them.
    fn admit(self: &Arc<Self>, client: &str, count: usize) -> Result<Vec<QueueSlot>, String> {
        let mut counts = self.counts.lock().expect("prefetch queue poisoned");
        let (total, clients) = &mut *counts;
        let mine = clients.get(client).copied().unwrap_or(0);
        if mine + count > self.client_limit {
            return Err(format!(
                "{client} has {mine} references queued or running in prefetches; {count} more \
                 would pass the limit of {} (limits.max_prefetch_per_client)",
                self.client_limit
            ));
        }
        if *total + count > self.total_limit {
            return Err(format!(
                "{total} references are queued or running in prefetches; {count} more would \
                 pass the limit of {} (limits.max_prefetch_queue)",
                self.total_limit
            ));
        }
        *total += count;
        *clients.entry(client.to_owned()).or_default() += count;
        Ok((0..count)
            .map(|_| QueueSlot {
                queue: self.clone(),
                client: client.to_owned(),
            })
            .collect())
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        let mut counts = self.queue.counts.lock().expect("prefetch queue poisoned");
        let (total, clients) = &mut *counts;
        *total -= 1;
        if let Some(mine) = clients.get_mut(&self.client) {
            *mine -= 1;
            if *mine == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

impl Prefetcher {
    /// A prefetcher running at most `prefetch_concurrency` fetches at once, whose downloads
    /// hold at most `prefetch_download_share` of the download permits (so on-demand fetches
    /// never queue behind it), each held to `prefetch_max_bytes_per_second`.
    pub fn new(fetcher: &Fetcher) -> Prefetcher {
        let config = fetcher.config();
        Prefetcher {
            permits: Arc::new(Semaphore::new(config.prefetch_concurrency)),
            retries: config.prefetch_retries,
            queue: Arc::new(Queue {
                total_limit: config.limits.max_prefetch_queue,
                client_limit: config.limits.max_prefetch_per_client,
                counts: std::sync::Mutex::default(),
            }),
            fetcher: fetcher.for_prefetch(),
        }
    }

    /// The fetcher it drives.
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// Starts fetching `references` and returns their events. The work goes on if the
    /// receiver is dropped. With `pin`, each fetched reference is pinned by that source.
    pub fn start(
        &self,
        references: Vec<String>,
        pin: Option<PinSource>,
        policy: PullPolicy,
    ) -> mpsc::Receiver<Event> {
        self.start_with(references, pin, policy, Vec::new())
    }

    /// [`Prefetcher::start`] for a client of the APIs: its references count against
    /// `limits.max_prefetch_per_client` and `limits.max_prefetch_queue` until each one's
    /// prefetch ends (whether or not the client still listens); beyond them the whole call
    /// is refused, with the limit named.
    pub fn start_for(
        &self,
        client: &str,
        references: Vec<String>,
        pin: Option<PinSource>,
        policy: PullPolicy,
    ) -> Result<mpsc::Receiver<Event>, String> {
        let slots = self.queue.admit(client, references.len())?;
        Ok(self.start_with(references, pin, policy, slots))
    }

    fn start_with(
        &self,
        references: Vec<String>,
        pin: Option<PinSource>,
        policy: PullPolicy,
        slots: Vec<QueueSlot>,
    ) -> mpsc::Receiver<Event> {
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            let mut slots = slots.into_iter();
            for text in references {
                let _ = events.send(Event::Queued(text.clone())).await;
                let this = this.clone();
                let events = events.clone();
                let slot = slots.next();
                tasks.push(tokio::spawn(async move {
                    let _slot = slot;
                    let result = this.prefetch_one(&text, pin, policy, &events).await;
                    let ok = result.is_ok();
                    let event = match result {
                        Ok(fetched) => Event::Done {
                            reference: text,
                            fetched: Box::new(fetched),
                        },
                        Err(error) => {
                            warn!(reference = %text, error = %error_chain(&error), "prefetch failed");
                            Event::Failed {
                                reference: text,
                                error,
                            }
                        }
                    };
                    let _ = events.send(event).await;
                    ok
                }));
            }
            let (mut succeeded, mut failed) = (0, 0);
            for task in tasks {
                match task.await {
                    Ok(true) => succeeded += 1,
                    _ => failed += 1,
                }
            }
            let _ = events.send(Event::Summary { succeeded, failed }).await;
        });
        receiver
    }

    /// Runs `references` to the end and returns the summary.
    pub async fn run(
        &self,
        references: Vec<String>,
        pin: Option<PinSource>,
        policy: PullPolicy,
    ) -> (u32, u32) {
        let mut events = self.start(references, pin, policy);
        while let Some(event) = events.recv().await {
            if let Event::Summary { succeeded, failed } = event {
                return (succeeded, failed);
            }
        }
        (0, 0)
    }

    async fn prefetch_one(
        &self,
        text: &str,
        pin: Option<PinSource>,
        policy: PullPolicy,
        events: &mpsc::Sender<Event>,
    ) -> Result<Fetched, Error> {
        let reference: Reference = text.parse()?;
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the prefetch semaphore is never closed");
        let _ = events.send(Event::Resolving(text.to_owned())).await;
        let name = reference.to_string();
        let mut attempt = 0;
        let fetched = loop {
            let fetch = self.fetcher.fetch(&reference, policy);
            tokio::pin!(fetch);
            let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
            let result = loop {
                tokio::select! {
                    result = &mut fetch => break result,
                    _ = ticks.tick() => {
                        if let Some((done, total)) = self.fetcher.progress(&name) {
                            let _ = events.try_send(Event::Downloading {
                                reference: text.to_owned(),
                                done,
                                total,
                            });
                        }
                    }
                }
            };
            match result {
                Err(error) if error.is_transient() && attempt < self.retries => {
                    let delay = RETRY_BACKOFF * 2u32.pow(attempt);
                    attempt += 1;
                    debug!(reference = %name, attempt, ?delay, "transient error; retrying");
                    tokio::time::sleep(delay).await;
                }
                other => break other?,
            }
        };
        if let Some(source) = pin {
            self.fetcher
                .store()
                .pin(&name, source)
                .map_err(|source| Error::Pin {
                    reference: name.clone(),
                    source,
                })?;
        }
        Ok(fetched)
    }
}

/// Watches the prefetch lists, fetches what they name, refreshes listed and pinned tags every
/// `refresh_interval`, and reports on `initial_done` once the first reading was attempted.
pub async fn watch_lists(
    prefetcher: Prefetcher,
    config: Arc<Config>,
    token: CancellationToken,
    initial_done: oneshot::Sender<()>,
) {
    let paths = config.prefetch_files.clone();
    let (changed, mut changes) = mpsc::channel::<()>(1);
    // Watch each list's directory, not the file: renames and symlink swaps replace the file.
    let _watcher = if paths.is_empty() {
        None
    } else {
        match crate::watch::watch_directories(&paths, changed) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                warn!(%error, "cannot watch the prefetch lists; they are read once");
                None
            }
        }
    };
    let mut listed: BTreeMap<String, bool> = BTreeMap::new();
    apply_lists(&prefetcher, &paths, &mut listed).await;
    let _ = initial_done.send(());

    let mut refresh = tokio::time::interval(config.refresh_interval);
    refresh.tick().await;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            Some(()) = changes.recv() => {
                crate::watch::settle(&mut changes).await;
                apply_lists(&prefetcher, &paths, &mut listed).await;
            }
            _ = refresh.tick() => refresh_tags(&prefetcher, &listed),
        }
    }
}

/// Re-reads the lists: fetches new entries, unpins entries that left (or lost their `pin`).
async fn apply_lists(
    prefetcher: &Prefetcher,
    paths: &[PathBuf],
    listed: &mut BTreeMap<String, bool>,
) {
    let entries = load_lists(paths);
    let now: BTreeMap<String, bool> = entries
        .iter()
        .map(|e| (e.reference.to_string(), e.pin))
        .collect();
    let store = prefetcher.fetcher().store();
    for (reference, pinned) in listed.iter() {
        let still_pinned = now.get(reference).copied().unwrap_or(false);
        if *pinned && !still_pinned {
            if let Ok(true) = store.unpin_from(reference, PinSource::List) {
                info!(%reference, "unpinned: no longer pinned by a prefetch list");
            }
        }
    }
    let wanted: Vec<(String, bool)> = now
        .iter()
        .filter(|(reference, pin)| listed.get(*reference) != Some(pin))
        .map(|(reference, pin)| (reference.clone(), *pin))
        .collect();
    *listed = now;
    if wanted.is_empty() {
        return;
    }
    info!(references = wanted.len(), "prefetching from the lists");
    let (pinned, unpinned): (Vec<_>, Vec<_>) = wanted.into_iter().partition(|(_, pin)| *pin);
    let names = |list: Vec<(String, bool)>| list.into_iter().map(|(r, _)| r).collect::<Vec<_>>();
    let (a, b) = tokio::join!(
        prefetcher.run(
            names(pinned),
            Some(PinSource::List),
            PullPolicy::IfNotPresent
        ),
        prefetcher.run(names(unpinned), None, PullPolicy::IfNotPresent),
    );
    info!(
        succeeded = a.0 + b.0,
        failed = a.1 + b.1,
        "prefetch lists applied"
    );
}

/// Re-resolves listed and pinned tags in the background; a failure keeps the old digest.
fn refresh_tags(prefetcher: &Prefetcher, listed: &BTreeMap<String, bool>) {
    let mut references: Vec<String> = listed.keys().cloned().collect();
    if let Ok(pins) = prefetcher.fetcher().store().pins() {
        references.extend(pins.into_iter().map(|(reference, _)| reference));
    }
    references.sort();
    references.dedup();
    references.retain(|r| !r.contains('@'));
    if references.is_empty() {
        return;
    }
    debug!(references = references.len(), "refreshing tags");
    let prefetcher = prefetcher.clone();
    tokio::spawn(async move {
        prefetcher.run(references, None, PullPolicy::Always).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_lists_with_comments_pins_and_bad_lines() {
        let text = "# modules for the gateway\n\
                    ghcr.io/a/b:v1\n\
                    \n\
                    oci://ghcr.io/a/c:v2 pin   # keep\n\
                    ghcr.io/Bad/ref\n\
                    ghcr.io/a/d:v1 keep\n\
                    webassemblyhub.io/user/filter:v1\n";
        let (entries, bad) = parse_list(text, Path::new("list.txt"));
        let names: Vec<String> = entries.iter().map(|e| e.reference.to_string()).collect();
        assert_eq!(
            names,
            [
                "ghcr.io/a/b:v1",
                "ghcr.io/a/c:v2",
                "webassemblyhub.io/user/filter:v1"
            ]
        );
        assert_eq!(
            entries.iter().map(|e| e.pin).collect::<Vec<_>>(),
            [false, true, false]
        );
        assert_eq!(bad.len(), 2);
        assert_eq!((bad[0].line, bad[1].line), (5, 6));
        assert!(bad[0].reason.contains("invalid reference"));
        assert!(bad[1].reason.contains("'keep'"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,200}") {
            let (entries, bad) = parse_list(&text, Path::new("x"));
            prop_assert!(entries.len() + bad.len() <= text.lines().count());
        }
    }
}
