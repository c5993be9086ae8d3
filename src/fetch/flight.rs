//! Single-flight: concurrent callers asking for the same key share one run of the work.
//!
//! The work runs in its own task, so a caller that gives up (a cancelled RPC, a closed
//! connection) never cancels what other callers are waiting on. The key is forgotten as soon
//! as the work finishes; the next caller starts a fresh run.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::Error;

type Flight<T> = Shared<BoxFuture<'static, Result<T, Arc<Error>>>>;

/// The runs in flight, by key.
pub(crate) struct SingleFlight<K, T> {
    inflight: Arc<Mutex<HashMap<K, Flight<T>>>>,
}

impl<K, T> Clone for SingleFlight<K, T> {
    fn clone(&self) -> Self {
        SingleFlight {
            inflight: self.inflight.clone(),
        }
    }
}

impl<K, T> Default for SingleFlight<K, T> {
    fn default() -> Self {
        SingleFlight {
            inflight: Arc::default(),
        }
    }
}

impl<K, T> SingleFlight<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Joins the run for `key`, starting it with `work` if none is in flight. Returns the
    /// shared result and whether an existing run was joined.
    pub(crate) fn run<F>(
        &self,
        key: K,
        work: impl FnOnce() -> F,
        on_panic: impl FnOnce() -> Error + Send + 'static,
    ) -> (Flight<T>, bool)
    where
        F: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let mut inflight = self.inflight.lock().expect("single-flight map poisoned");
        if let Some(flight) = inflight.get(&key) {
            return (flight.clone(), true);
        }
        let work = work();
        let map = self.inflight.clone();
        let owned_key = key.clone();
        // The task removes its key under the same lock that inserts it, so the removal cannot
        // come before the insertion below.
        let task = tokio::spawn(async move {
            let result = work.await.map_err(Arc::new);
            map.lock()
                .expect("single-flight map poisoned")
                .remove(&owned_key);
            result
        });
        let flight = async move {
            match task.await {
                Ok(result) => result,
                Err(_) => Err(Arc::new(on_panic())),
            }
        }
        .boxed()
        .shared();
        inflight.insert(key, flight.clone());
        (flight, false)
    }

    /// How many runs are in flight.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inflight
            .lock()
            .expect("single-flight map poisoned")
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn panicked() -> Error {
        Error::TaskFailed {
            reference: "test".into(),
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights = SingleFlight::<&str, usize>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        let mut joined = 0;
        for _ in 0..100 {
            let runs = runs.clone();
            let (flight, was_joined) = flights.run(
                "k",
                move || async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
                },
                panicked,
            );
            joined += usize::from(was_joined);
            waiters.push(flight);
        }
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), 1);
        }
        assert_eq!(joined, 99);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_caller_does_not_cancel_the_run() {
        let flights = SingleFlight::<&str, u8>::default();
        let (first, _) = flights.run(
            "k",
            || async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(7)
            },
            panicked,
        );
        drop(first);
        let (second, joined) = flights.run("k", || async { Ok(8) }, panicked);
        assert!(joined);
        assert_eq!(second.await.unwrap(), 7);
    }
}
