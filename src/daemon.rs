//! The node daemon's lifecycle: lock the data dir, open the store, listen, serve, drain.
//!
//! [`run`] owns start-up and shutdown only; what is served comes from `api`. Shutdown follows
//! mini-redis: one root cancellation token, every listener on a child token, a task tracker to
//! wait for them. On the shutdown signal the daemon reports not-ready, stops accepting,
//! lets requests in flight finish for up to `shutdown_grace`, flushes the index and removes
//! its socket.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api;
use crate::config::Config;
use crate::fetch::Fetcher;
use crate::metrics::Metrics;
use crate::prefetch::{self, Prefetcher};
use crate::registry::{self, RegistryClient};
use crate::store::{self, Store};

/// Name of the lock file that keeps a second daemon off the same data dir.
const LOCK_FILE: &str = "wasmcache.lock";

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data dir or socket dir could not be created or used.
    #[error("cannot use {path}")]
    Path {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the data dir.
    #[error("data dir {path} is in use by another wasmcache process (lock file {lock})")]
    Locked {
        /// The data dir.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// A live daemon answers on the socket.
    #[error("socket {path} is in use by a running daemon")]
    SocketInUse {
        /// The socket.
        path: PathBuf,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {address}")]
    Bind {
        /// The socket path or TCP address.
        address: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The registry client could not be set up.
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// The peers could not be set up.
    #[error(transparent)]
    Peers(#[from] crate::peers::Error),
    /// A signature policy's key could not be read.
    #[error(transparent)]
    SignatureKey(#[from] crate::signature::KeyError),
}

/// Runs the daemon until `shutdown` completes, then drains and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let started = Instant::now();
    let path_error = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Path { path, source }
    };
    fs::create_dir_all(&config.data_dir).map_err(path_error(&config.data_dir))?;
    let _lock = lock_data_dir(&config.data_dir)?;
    let store = {
        let root = config.data_dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&root))
            .await
            .expect("opening the store panicked")?
    };
    let metrics = Metrics::default();
    metrics.reconciled(&store.reconciled().counts());
    metrics.set_budget(config.max_cache_bytes);
    let registry = RegistryClient::new(&config, metrics.clone())?;
    let config = Arc::new(config);
    let address_policy = registry.address_policy().clone();
    let budget = registry.document_budget().clone();
    let peers = crate::peers::Peers::new(&config, address_policy, budget, metrics.clone())?;
    if let Some(peers) = &peers {
        // Membership before the first fetch (bounded by the DNS lookup's timeout).
        peers.refresh().await;
    }
    let fetcher = Fetcher::new(registry.clone(), store.clone(), config.clone(), metrics)
        .with_peers(peers.clone());
    fetcher.load_signature_policies()?;
    let prefetcher = Prefetcher::new(&fetcher);
    let tcp_token = match &config.tcp_token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    let state = api::State::new(fetcher, prefetcher.clone()).with_tcp_token(tcp_token);
    let server = Arc::new(api::Server::new(state.clone()));
    server.set_health(false).await;

    let socket = config.socket_path();
    let unix = bind_socket(&socket, config.socket_mode, config.socket_group)?;
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    {
        let (server, stop) = (server.clone(), token.child_token());
        tracker.spawn(async move { server.serve_unix(unix, stop).await });
    }
    let mut tcp = Vec::new();
    for address in [config.grpc_listen, config.http_listen]
        .into_iter()
        .flatten()
    {
        if !tcp.contains(&address) {
            tcp.push(address);
        }
    }
    for address in tcp {
        let listener = bind_tcp(address).await?;
        info!(%address, "listening on TCP");
        let (server, stop) = (server.clone(), token.child_token());
        tracker.spawn(async move { server.serve_tcp(listener, stop).await });
    }
    if let Some(address) = config.peers.listen {
        let listener = bind_tcp(address).await?;
        info!(%address, "listening for peers");
        let (server, stop) = (server.clone(), token.child_token());
        tracker.spawn(async move { server.serve_peers(listener, stop).await });
    }
    if let Some(peers) = peers {
        info!(
            own = peers.own_address(),
            members = peers.members().len(),
            "fetching through peers"
        );
        tracker.spawn(peers.run(token.child_token()));
    }
    if config.wasme_compat {
        let listener = bind_tcp(config.wasme_listen).await?;
        info!(address = %config.wasme_listen, "serving the wasme cache API");
        let (server, stop) = (server.clone(), token.child_token());
        tracker.spawn(async move { server.serve_wasme(listener, stop).await });
    }
    let (initial_done, initial) = oneshot::channel();
    tracker.spawn(prefetch::watch_lists(
        prefetcher,
        config.clone(),
        token.child_token(),
        initial_done,
    ));
    tracker.spawn(collect_garbage(state.fetcher.clone(), token.child_token()));
    tracker.spawn(trim_when_idle(server.activity(), token.child_token()));
    tracker.spawn(watch_credentials(registry, token.child_token()));
    if let Some(file) = config.tcp_token_file.clone() {
        tracker.spawn(watch_tcp_token(file, state.clone(), token.child_token()));
    }
    tracker.spawn(watch_signature_keys(
        state.fetcher.clone(),
        token.child_token(),
    ));
    tracker.close();
    // Ready once serving, or once the prefetch lists were attempted when so configured.
    let gate = config.ready_after_prefetch && !config.prefetch_files.is_empty();
    {
        let (state, server) = (state.clone(), server.clone());
        tokio::spawn(async move {
            if gate {
                let _ = initial.await;
                info!("initial prefetch attempted; ready");
            }
            state.set_ready(true);
            server.set_health(true).await;
        });
    }
    info!(
        socket = %socket.display(),
        data_dir = %config.data_dir.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "serving"
    );

    shutdown.await;
    info!(grace = ?config.shutdown_grace, "shutting down");
    state.set_ready(false);
    server.set_health(false).await;
    token.cancel();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!("shutdown grace period over; closing the remaining connections");
    }
    store.persist_access()?;
    if let Err(error) = fs::remove_file(&socket) {
        warn!(socket = %socket.display(), %error, "could not remove the socket");
    }
    info!("stopped");
    Ok(())
}

/// Reloads the registry credentials when their files change (a rotated Secret, say).
async fn watch_credentials(registry: RegistryClient, token: CancellationToken) {
    let files = registry.credential_files().to_vec();
    let reload = move || registry.reload_credentials().map(drop);
    watch_files(files, "credential files", reload, token).await;
}

/// Reloads the TCP token when its file changes (a rotated Secret): the new token is asked for
/// from then on; a file that cannot be read keeps the old one.
async fn watch_tcp_token(file: PathBuf, state: api::State, token: CancellationToken) {
    let reload = {
        let file = file.clone();
        move || {
            let new = read_token(&file)?;
            let changed = state.tcp_token().as_deref() != Some(new.as_str());
            if changed {
                info!(file = %file.display(), "TCP token reloaded");
                state.set_tcp_token(Some(new));
            }
            Ok::<_, Error>(())
        }
    };
    watch_files(vec![file], "TCP token file", reload, token).await;
}

/// Reloads the signature policies' keys when their files change (a rotated Secret); a
/// changed key set verifies modules again at their next use.
async fn watch_signature_keys(fetcher: Fetcher, token: CancellationToken) {
    let files = fetcher.signature_key_files();
    let reload = move || fetcher.load_signature_policies();
    watch_files(files, "signature key files", reload, token).await;
}

/// Runs `reload` on a blocking thread whenever one of `files` changes (the directories are
/// watched, so replaced files are seen), until `token`; a failed reload keeps what was loaded.
async fn watch_files<E>(
    files: Vec<PathBuf>,
    what: &'static str,
    reload: impl Fn() -> Result<(), E> + Clone + Send + 'static,
    token: CancellationToken,
) where
    E: std::error::Error + Send + 'static,
{
    let files: Vec<PathBuf> = files
        .into_iter()
        .filter(|file| file.parent().is_some_and(Path::is_dir))
        .collect();
    if files.is_empty() {
        return;
    }
    let (changed, mut changes) = tokio::sync::mpsc::channel(1);
    let _watcher = match crate::watch::watch_directories(&files, changed) {
        Ok(watcher) => watcher,
        Err(error) => {
            warn!(%error, "cannot watch the {what}; they are read once");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            Some(()) = changes.recv() => {
                crate::watch::settle(&mut changes).await;
                let reloaded = tokio::task::spawn_blocking(reload.clone()).await;
                if let Ok(Err(error)) = reloaded {
                    warn!(error = %crate::error::error_chain(&error), "{what} not reloaded; keeping what was loaded");
                }
            }
        }
    }
}

/// Every `gc_interval`: evicts what the budget and `max_age` say, saves access times.
async fn collect_garbage(fetcher: Fetcher, token: CancellationToken) {
    // The first pass waits one interval: at start-up nobody has had a chance to lease or use
    // a module yet.
    let period = fetcher.config().gc_interval;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = ticks.tick() => {
                fetcher.evict(0).await;
                let store = fetcher.store().clone();
                let saved = tokio::task::spawn_blocking(move || store.persist_access()).await;
                if let Ok(Err(error)) = saved {
                    warn!(error = %crate::error::error_chain(&error), "saving access times failed");
                }
            }
        }
    }
}

/// How often [`trim_when_idle`] looks at the connections' activity.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Gives the memory that a burst of requests left free back to the system, once no request
/// has come for one [`IDLE_CHECK`] after a busy spell.
///
/// glibc keeps freed memory in its arenas for reuse. After thousands of distinct requests
/// (every module fetched once at start-up, say) that is several MiB of resident memory the
/// node never gets back; `malloc_trim` returns the free pages. It runs on a blocking thread,
/// at most once per burst.
async fn trim_when_idle(activity: Arc<api::serve::Activity>, token: CancellationToken) {
    let mut ticks = tokio::time::interval(IDLE_CHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut busy) = (activity.requests(), false);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let requests = activity.requests();
        if requests != seen {
            (seen, busy) = (requests, true);
        } else if busy {
            busy = false;
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

/// Returns the allocator's free pages to the system (glibc's `malloc_trim`).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads the TCP bearer token (surrounding white space dropped; never logged).
fn read_token(path: &Path) -> Result<String, Error> {
    let text = fs::read_to_string(path).map_err(|source| Error::Path {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(Error::Path {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, "the token file is empty"),
        });
    }
    Ok(token)
}

async fn bind_tcp(address: std::net::SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind {
            address: address.to_string(),
            source,
        })
}

/// Takes an exclusive lock on `<data-dir>/wasmcache.lock`, held for the daemon's lifetime.
fn lock_data_dir(data_dir: &Path) -> Result<fs::File, Error> {
    let lock = data_dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| Error::Path {
            path: lock.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(Error::Locked {
            path: data_dir.to_owned(),
            lock,
        }),
        Err(fs::TryLockError::Error(source)) => Err(Error::Path { path: lock, source }),
    }
}

/// Binds the unix socket, replacing a stale socket file left by a crash, and sets its mode.
fn bind_socket(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, Error> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| Error::Path {
            path: parent.to_owned(),
            source,
        })?;
    }
    if let Ok(metadata) = fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(Error::Path {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::SocketInUse {
                path: path.to_owned(),
            });
        }
        info!(socket = %path.display(), "replacing a stale socket");
        fs::remove_file(path).map_err(|source| Error::Path {
            path: path.to_owned(),
            source,
        })?;
    }
    let bind_error = |source| Error::Bind {
        address: path.display().to_string(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(bind_error)?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(bind_error)?;
    Ok(listener)
}
