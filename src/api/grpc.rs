//! The `wasmcache.v1.WasmCache` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::error::{client_message, status, store_status};
use super::guard;
use super::proto::prefetch_progress::Stage;
use super::proto::wasm_cache_server::{WasmCache, WasmCacheServer};
use super::proto::{
    EvictedModule, FetchRequest, FetchResponse, GcRequest, GcResponse, LeaseRequest, LeaseResponse,
    ListRequest, ListResponse, ModuleChunk, PinRequest, PinResponse, PrefetchProgress,
    PrefetchRequest, PullPolicy, ReadModuleRequest, ReleaseLeaseRequest, ReleaseLeaseResponse,
    RemoveRequest, RemoveResponse, SignatureVerdict, StatRequest, StatResponse, UsageRequest,
    UsageResponse, VerifyRequest, VerifyResponse, WasmeMetadata,
};
use super::respond::read_blob;
use super::{Refused, State};
use crate::digest::Digest;
use crate::fetch::memo::AnswerMemo;
use crate::fetch::{self, Fetched};
use crate::prefetch::{self as prefetching, Event};
use crate::reference::Reference;
use crate::store::PinSource;

/// Fully qualified name of the service, as used by gRPC health.
pub const SERVICE_NAME: &str = "wasmcache.v1.WasmCache";
/// Entries in a `List` page when the request names no size.
const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest `List` page.
const MAX_PAGE_SIZE: usize = 1000;
/// Bytes per `ReadModule` message (well under gRPC's 4 MiB default message limit).
const READ_CHUNK_BYTES: usize = 1 << 20;

/// The service, ready to add to a router.
pub fn service(state: State) -> WasmCacheServer<Api> {
    let limit = state.fetcher.config().limits.max_request_bytes;
    let api = Api {
        state,
        warm: Arc::default(),
    };
    WasmCacheServer::new(api).max_decoding_message_size(limit)
}

/// Implementation of the gRPC service.
pub struct Api {
    state: State,
    /// Answers to warm hits by the reference text clients sent, so that a repeated `Fetch`
    /// is answered without parsing, index reads or encoding digests again (kept from a
    /// text's second hit on).
    warm: Arc<AnswerMemo<Arc<WarmAnswer>>>,
}

/// A `Fetch` answer kept for the text that asked for it, with what checking it again needs.
struct WarmAnswer {
    /// Whether the reference names a tag (its age is checked against the policy).
    is_tag: bool,
    resolved_at: u64,
    digest: Digest,
    format: &'static str,
    response: FetchResponse,
}

/// The caller's deadline, from gRPC's `grpc-timeout` header (`<digits><unit>`, unit one of
/// `H M S m u n`); `None` when absent or malformed.
fn caller_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// The pull policy a `Fetch` asks for.
fn pull_policy(request: &FetchRequest) -> fetch::PullPolicy {
    match request.pull_policy() {
        PullPolicy::Unspecified | PullPolicy::IfNotPresent => fetch::PullPolicy::IfNotPresent,
        PullPolicy::Always => fetch::PullPolicy::Always,
        PullPolicy::Never => fetch::PullPolicy::Never,
    }
}

/// `FetchResponse` is both the answer to `Fetch` and the entry of `Stat` and `List`.
pub fn to_response(fetched: Fetched) -> FetchResponse {
    FetchResponse {
        reference: fetched.reference,
        path: fetched.path.display().to_string(),
        digest: fetched.digest.to_string(),
        size: fetched.size,
        manifest_digest: fetched.manifest_digest.to_string(),
        resolved_digest: fetched.resolved_digest.to_string(),
        index_digest: fetched
            .index_digest
            .map(|d| d.to_string())
            .unwrap_or_default(),
        format: fetched.format.to_string(),
        cache_hit: fetched.cache_hit,
        stale: fetched.stale,
        resolved_at_unix: i64::try_from(fetched.resolved_at).unwrap_or(i64::MAX),
        lease_id: 0,
        lease_expires_unix: 0,
        wasme: fetched.wasme.map(|w| WasmeMetadata {
            r#type: w.kind.unwrap_or_default(),
            abi_versions: w.abi_versions,
            root_ids: w.root_ids,
        }),
        proxy_wasm_abi: fetched.proxy_wasm_abi,
        signature: fetched.signature.map(|s| SignatureVerdict {
            verified: s.verified,
            key: s.key,
            scope: s.scope,
            signature_digest: s.signature,
        }),
    }
}

/// The stream event for a prefetch event.
fn progress(event: Event) -> PrefetchProgress {
    match event {
        Event::Queued(reference) => PrefetchProgress {
            stage: Stage::Queued.into(),
            reference,
            ..Default::default()
        },
        Event::Resolving(reference) => PrefetchProgress {
            stage: Stage::Resolving.into(),
            reference,
            ..Default::default()
        },
        Event::Downloading {
            reference,
            done,
            total,
        } => PrefetchProgress {
            stage: Stage::Downloading.into(),
            reference,
            bytes_done: done,
            bytes_total: total,
            ..Default::default()
        },
        Event::Done { reference, fetched } => PrefetchProgress {
            stage: Stage::Done.into(),
            reference,
            bytes_done: fetched.size,
            bytes_total: fetched.size,
            result: Some(to_response(*fetched)),
            ..Default::default()
        },
        Event::Failed { reference, error } => {
            let code = match &error {
                prefetching::Error::Reference(_) => tonic::Code::InvalidArgument,
                prefetching::Error::Fetch(error) => super::error::code(error),
                prefetching::Error::Pin { .. } => tonic::Code::Internal,
            };
            PrefetchProgress {
                stage: Stage::Failed.into(),
                reference,
                error_code: super::error::code_name(code).to_owned(),
                message: client_message(&error),
                ..Default::default()
            }
        }
        Event::Summary { succeeded, failed } => PrefetchProgress {
            stage: Stage::Summary.into(),
            succeeded,
            failed,
            ..Default::default()
        },
    }
}

fn parse_reference(state: &State, text: &str) -> Result<Reference, Status> {
    state
        .parse_reference(text)
        .map_err(Status::invalid_argument)
}

/// A reference or a `sha256:` digest, as `Stat` and `Remove` take.
enum Target {
    Reference(Reference),
    Digest(Digest),
}

fn parse_target(state: &State, text: &str) -> Result<Target, Status> {
    if text.starts_with("sha256:") {
        text.parse()
            .map(Target::Digest)
            .map_err(|error: crate::digest::ParseError| Status::invalid_argument(error.to_string()))
    } else {
        parse_reference(state, text).map(Target::Reference)
    }
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::store::Error> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Status::internal("store task failed"))?
        .map_err(|error| store_status(&error))
}

impl Api {
    /// The answer kept for `request` at index `generation`, if it still holds: the tag is
    /// fresh enough for `policy` and the module file is there. Counted as a warm hit.
    fn kept_answer(
        &self,
        request: &FetchRequest,
        policy: fetch::PullPolicy,
        generation: u64,
        started: std::time::Instant,
    ) -> Option<Arc<WarmAnswer>> {
        if request.lease_seconds != 0 || !request.expected_sha256.is_empty() {
            return None;
        }
        let fetcher = &self.state.fetcher;
        let warm = self.warm.get(&request.reference, generation)?;
        if !fetcher.fresh_enough(warm.is_tag, policy, warm.resolved_at)
            || !fetcher.store().has_blob(&warm.digest)
        {
            return None;
        }
        fetcher.answered_from_memory(&warm.digest, warm.format, started);
        Some(warm)
    }

    fn lease_duration(&self, seconds: u32) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(seconds))
            .min(self.state.fetcher.config().max_lease)
    }

    fn usage_response(&self, usage: crate::store::Usage) -> UsageResponse {
        let config = self.state.fetcher.config();
        let mark = |ratio: f64| (config.max_cache_bytes as f64 * ratio) as u64;
        UsageResponse {
            bytes: usage.bytes,
            modules: usage.modules,
            max_cache_bytes: config.max_cache_bytes,
            high_watermark_bytes: mark(config.cache_high_watermark),
            low_watermark_bytes: mark(config.cache_low_watermark),
        }
    }
}

#[tonic::async_trait]
impl WasmCache for Api {
    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let started = std::time::Instant::now();
        let client = request.extensions().get::<guard::Client>().cloned();
        let deadline = caller_deadline(request.metadata());
        let request = request.into_inner();
        let policy = pull_policy(&request);
        let fetcher = &self.state.fetcher;
        // Read before anything is looked up: an answer is kept only for the index it came from.
        let generation = fetcher.answers_generation();
        if let Some(warm) = self.kept_answer(&request, policy, generation, started) {
            return Ok(Response::new(warm.response.clone()));
        }
        let reference = parse_reference(&self.state, &request.reference)?;
        let expected =
            State::parse_expected(&request.expected_sha256).map_err(Status::invalid_argument)?;
        let fetched = self
            .state
            .fetch_for(
                client.as_ref(),
                &reference,
                policy,
                deadline,
                expected.as_ref(),
            )
            .await
            .map_err(|refused| match refused {
                Refused::TooMany(message) => Status::resource_exhausted(message),
                Refused::NotCached(message) => Status::not_found(message),
                Refused::Fetch(error) => status(&error),
            })?;
        let lease = (request.lease_seconds > 0).then(|| {
            fetcher
                .store()
                .lease(&fetched.digest, self.lease_duration(request.lease_seconds))
        });
        let warm = fetched.cache_hit && !fetched.stale;
        let (digest, format, resolved_at) = (
            fetched.digest.clone(),
            fetched.format.as_str(),
            fetched.resolved_at,
        );
        let mut response = to_response(fetched);
        if warm {
            let answer = Arc::new(WarmAnswer {
                is_tag: reference.digest().is_none(),
                resolved_at,
                digest,
                format,
                response: response.clone(),
            });
            self.warm.offer(&request.reference, generation, &answer);
        }
        if let Some(lease) = lease {
            response.lease_id = lease.id;
            response.lease_expires_unix = i64::try_from(lease.expires).unwrap_or(i64::MAX);
        }
        Ok(Response::new(response))
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let text = request.into_inner().target;
        let target = parse_target(&self.state, &text)?;
        let store = self.state.fetcher.store().clone();
        let entries = blocking(move || {
            Ok(match target {
                Target::Reference(reference) => store
                    .lookup_reference(&reference.to_string())?
                    .into_iter()
                    .collect(),
                Target::Digest(digest) => store
                    .list()?
                    .into_iter()
                    .filter(|e| e.digest == digest || e.manifest_digest == digest)
                    .collect::<Vec<_>>(),
            })
        })
        .await?;
        if entries.is_empty() {
            return Err(Status::not_found(format!("{text} is not cached")));
        }
        let fetcher = &self.state.fetcher;
        let with_signature = |entry: Fetched| Fetched {
            signature: fetcher.signature_status(&entry),
            ..entry
        };
        Ok(Response::new(StatResponse {
            entries: entries
                .into_iter()
                .map(with_signature)
                .map(to_response)
                .collect(),
        }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let store = self.state.fetcher.store().clone();
        let after = request.page_token;
        let mut entries = blocking(move || store.list()).await?;
        entries.retain(|e| after.is_empty() || e.reference > after);
        let next_page_token = if entries.len() > page_size {
            entries.truncate(page_size);
            entries
                .last()
                .map(|e| e.reference.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListResponse {
            entries: entries.into_iter().map(to_response).collect(),
            next_page_token,
        }))
    }

    async fn remove(
        &self,
        request: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        let text = request.into_inner().target;
        let target = parse_target(&self.state, &text)?;
        let store = self.state.fetcher.store().clone();
        let removed = blocking(move || match target {
            Target::Reference(reference) => store.remove_reference(&reference.to_string()),
            Target::Digest(digest) => store.remove_digest(&digest),
        })
        .await?;
        if removed.references.is_empty() && removed.modules.is_empty() {
            return Err(Status::not_found(format!("{text} is not cached")));
        }
        Ok(Response::new(RemoveResponse {
            references: removed.references,
            modules: removed.modules.iter().map(ToString::to_string).collect(),
        }))
    }

    type PrefetchStream = Pin<Box<dyn Stream<Item = Result<PrefetchProgress, Status>> + Send>>;

    async fn prefetch(
        &self,
        request: Request<PrefetchRequest>,
    ) -> Result<Response<Self::PrefetchStream>, Status> {
        let client = request.extensions().get::<guard::Client>().cloned();
        let client = client.unwrap_or(guard::Client::Unknown).to_string();
        let request = request.into_inner();
        let pin = request.pin.then_some(PinSource::Api);
        let mut events = self
            .state
            .prefetcher
            .start_for(
                &client,
                request.references,
                pin,
                fetch::PullPolicy::IfNotPresent,
            )
            .map_err(Status::resource_exhausted)?;
        let stream = async_stream::stream! {
            while let Some(event) = events.recv().await {
                yield Ok(progress(event));
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn pin(&self, request: Request<PinRequest>) -> Result<Response<PinResponse>, Status> {
        let reference = parse_reference(&self.state, &request.into_inner().reference)?;
        let fetched = self
            .state
            .fetcher
            .fetch(&reference, fetch::PullPolicy::IfNotPresent)
            .await
            .map_err(|error| status(&error))?;
        let store = self.state.fetcher.store().clone();
        let name = reference.to_string();
        let changed = blocking(move || {
            let before = store.pin(&name, PinSource::Api)?;
            Ok(before != Some(PinSource::Api))
        })
        .await?;
        Ok(Response::new(PinResponse {
            reference: reference.to_string(),
            digest: fetched.digest.to_string(),
            changed,
        }))
    }

    async fn unpin(&self, request: Request<PinRequest>) -> Result<Response<PinResponse>, Status> {
        let reference = parse_reference(&self.state, &request.into_inner().reference)?;
        let store = self.state.fetcher.store().clone();
        let name = reference.to_string();
        let (changed, digest) = blocking(move || {
            let changed = store.unpin(&name)?.is_some();
            let digest = store
                .lookup_reference(&name)?
                .map(|e| e.digest.to_string())
                .unwrap_or_default();
            Ok((changed, digest))
        })
        .await?;
        if !changed {
            return Err(Status::not_found(format!("{reference} is not pinned")));
        }
        Ok(Response::new(PinResponse {
            reference: reference.to_string(),
            digest,
            changed,
        }))
    }

    async fn lease(
        &self,
        request: Request<LeaseRequest>,
    ) -> Result<Response<LeaseResponse>, Status> {
        let request = request.into_inner();
        if request.seconds == 0 {
            return Err(Status::invalid_argument("a lease needs seconds > 0"));
        }
        let store = self.state.fetcher.store().clone();
        let digest = match parse_target(&self.state, &request.target)? {
            Target::Digest(digest) => digest,
            Target::Reference(reference) => {
                let name = reference.to_string();
                let key = name.clone();
                blocking(move || store.lookup_reference(&key))
                    .await?
                    .map(|e| e.digest)
                    .ok_or_else(|| Status::not_found(format!("{name} is not cached")))?
            }
        };
        let store = self.state.fetcher.store();
        if !store.has_blob(&digest) {
            return Err(Status::not_found(format!("module {digest} is not cached")));
        }
        let lease = store.lease(&digest, self.lease_duration(request.seconds));
        Ok(Response::new(LeaseResponse {
            lease_id: lease.id,
            digest: digest.to_string(),
            expires_unix: i64::try_from(lease.expires).unwrap_or(i64::MAX),
        }))
    }

    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        let id = request.into_inner().lease_id;
        if self.state.fetcher.store().release(id) {
            Ok(Response::new(ReleaseLeaseResponse {}))
        } else {
            Err(Status::not_found(format!(
                "lease {id} does not exist or has expired"
            )))
        }
    }

    async fn gc(&self, _: Request<GcRequest>) -> Result<Response<GcResponse>, Status> {
        let evicted = self.state.fetcher.evict(0).await;
        let store = self.state.fetcher.store().clone();
        let usage = blocking(move || store.usage()).await?;
        Ok(Response::new(GcResponse {
            evicted: evicted
                .into_iter()
                .map(|e| EvictedModule {
                    digest: e.digest.to_string(),
                    size: e.size,
                    reason: e.reason.as_str().to_owned(),
                })
                .collect(),
            usage: Some(self.usage_response(usage)),
        }))
    }

    async fn usage(&self, _: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let store = self.state.fetcher.store().clone();
        let usage = blocking(move || store.usage()).await?;
        Ok(Response::new(self.usage_response(usage)))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let repair = request.into_inner().repair;
        let store = self.state.fetcher.store().clone();
        let report = blocking(move || store.verify(repair)).await?;
        Ok(Response::new(VerifyResponse {
            checked: report.checked,
            bad: report.bad.iter().map(ToString::to_string).collect(),
            repaired: report.repaired,
        }))
    }

    type ReadModuleStream = Pin<Box<dyn Stream<Item = Result<ModuleChunk, Status>> + Send>>;

    async fn read_module(
        &self,
        request: Request<ReadModuleRequest>,
    ) -> Result<Response<Self::ReadModuleStream>, Status> {
        let text = request.into_inner().digest;
        let digest: Digest = text.parse().map_err(|error: crate::digest::ParseError| {
            Status::invalid_argument(error.to_string())
        })?;
        let store = self.state.fetcher.store().clone();
        let blob = digest.clone();
        let metrics = self.state.fetcher.metrics().clone();
        let (file, length) = tokio::task::spawn_blocking(move || store.open_blob(&blob))
            .await
            .expect("opening a blob panicked")
            .map_err(|error| {
                if error.kind() == std::io::ErrorKind::NotFound {
                    return Status::not_found(format!("module {digest} is not cached"));
                }
                metrics.blob_read_error("grpc");
                Status::data_loss(client_message(&error))
            })?;
        metrics.served("grpc", length);
        let mut chunks = Box::pin(read_blob(
            file,
            digest,
            0,
            length,
            READ_CHUNK_BYTES,
            metrics,
            "grpc",
        ));
        let stream = async_stream::stream! {
            let mut offset = 0;
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(data) => {
                        let size = data.len() as u64;
                        yield Ok(ModuleChunk { offset, data });
                        offset += size;
                    }
                    Err(error) => {
                        yield Err(Status::data_loss(client_message(&error)));
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
