//! Watching configuration files that other programs replace: prefetch lists and registry
//! credentials (kubelet swaps a mounted ConfigMap's or Secret's `..data` symlink; editors and
//! `mv` replace files). The directory is watched, not the file, so replacements are seen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;

/// Quiet time after a change before the files are re-read (renames come in bursts).
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches the directories holding `paths` (a path that is a directory is watched itself);
/// every change sends a unit on `changed` (coalesced: the channel holds at most one).
pub fn watch_directories(
    paths: &[PathBuf],
    changed: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = changed.try_send(());
        }
    })?;
    let mut watched: Vec<PathBuf> = Vec::new();
    for path in paths {
        let directory = if path.is_dir() {
            path.clone()
        } else {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        };
        if watched.contains(&directory) {
            continue;
        }
        watcher.watch(&directory, notify::RecursiveMode::NonRecursive)?;
        debug!(directory = %directory.display(), "watching");
        watched.push(directory);
    }
    Ok(watcher)
}

/// Called after a change arrived: waits out the burst of events that one rename or symlink
/// swap makes, so the files are read once.
pub async fn settle(changes: &mut mpsc::Receiver<()>) {
    tokio::time::sleep(DEBOUNCE).await;
    while changes.try_recv().is_ok() {}
}
