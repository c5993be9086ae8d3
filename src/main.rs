//! The `wasmcache` command: parses flags, sets up logging, and runs one subcommand.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use wasmcache::config::ConfigArgs;
use wasmcache::fetch::PullPolicy;
use wasmcache::store::Removed;
use wasmcache::wasmplugin::{self, WasmPlugin};
use wasmcache::{client, Config, Digest, Fetched, Fetcher, Reference, Store};

use inspect::Inspection;

mod inspect;
mod progress;

/// A node-local cache for WebAssembly modules stored in OCI registries.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log filter (tracing's env-filter syntax, e.g. `info` or `wasmcache=debug`)
    /// [default: info for serve, warn otherwise].
    #[arg(long, env = "WASMCACHE_LOG", global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon: gRPC and HTTP on a unix socket (and optional TCP listener).
    Serve,
    /// Ask the daemon for a module (pulling it once per node) and print its path.
    Fetch {
        /// `[oci://]registry[:port]/repository[:tag][@sha256:<hex>]`, or an `http(s)://` URL.
        reference: String,
        /// When to ask the registry about a tag.
        #[arg(long, value_enum, default_value_t = Policy::IfNotPresent)]
        pull_policy: Policy,
        /// The module's sha256 (or the digest the reference must resolve to); another module
        /// is refused and not recorded.
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Print one JSON object instead of the path.
        #[arg(long)]
        json: bool,
    },
    /// Ask the daemon to fetch modules ahead of need, showing progress; exits 1 if any failed.
    Prefetch {
        /// References to fetch.
        references: Vec<String>,
        /// Prefetch list files (one reference per line, optional `pin`, `#` comments).
        #[arg(long = "file")]
        files: Vec<std::path::PathBuf>,
        /// Pin every module fetched.
        #[arg(long)]
        pin: bool,
    },
    /// Pin a reference (fetching it if needed): never evicted, and `rm` refuses it.
    Pin {
        /// The reference.
        reference: String,
    },
    /// Unpin a reference.
    Unpin {
        /// The reference.
        reference: String,
    },
    /// Re-hash every blob; report bad ones (exit 1) or remove them with --repair.
    Verify {
        /// Remove bad blobs and their index entries.
        #[arg(long)]
        repair: bool,
    },
    /// Run eviction now (age, then size against the budget).
    Gc,
    /// Show cache usage against its budget.
    Du {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what the daemon has cached for a reference or digest.
    Stat {
        /// A reference or a `sha256:<hex>` digest.
        target: String,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Pull a module into the cache (no daemon needed) and print its path.
    Pull {
        /// `[oci://]registry[:port]/repository[:tag][@sha256:<hex>]`.
        reference: String,
        /// Print one JSON object instead of the path.
        #[arg(long)]
        json: bool,
    },
    /// Show what a module is: its packaging, digests and config, whether it is a core module
    /// or a component, what it imports, and the proxy-wasm ABI versions it exports. A
    /// reference is read from the cache (the daemon's, or the data dir's) or pulled like
    /// `pull`.
    Inspect {
        /// A module file, or `[oci://]registry[:port]/repository[:tag][@sha256:<hex>]`.
        target: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Check a module and push it to a registry (with the daemon's registry settings and
    /// credentials); prints the manifest's digest.
    Push {
        /// The module (`.wasm`), checked as a pulled one is before anything is sent.
        file: std::path::PathBuf,
        /// `[oci://]registry[:port]/repository[:tag]` (tag `latest` when none is given).
        reference: String,
        /// The packaging: the CNCF Wasm artifact, or solo.io's wasme image.
        #[arg(long, value_enum, default_value_t = PushFormat::Cncf)]
        format: PushFormat,
        /// A proxy-wasm ABI version the module speaks (wasme `abiVersions`; repeatable).
        #[arg(long = "abi-version", value_name = "VERSION")]
        abi_versions: Vec<String>,
        /// A root id the module registers (wasme `rootIds`; repeatable).
        #[arg(long = "root-id", value_name = "ID")]
        root_ids: Vec<String>,
        /// A manifest annotation (repeatable).
        #[arg(long = "annotation", value_name = "KEY=VALUE")]
        annotations: Vec<String>,
        /// Print one JSON object instead of the digest.
        #[arg(long)]
        json: bool,
    },
    /// List cached references and modules.
    Ls {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Check the daemon over its socket (for exec probes): exit 0 when it is ready, 1 when it
    /// is starting, stopping or unreachable; with --live, 0 as soon as it answers at all.
    Health {
        /// Only check that the daemon answers (liveness), not that it is ready.
        #[arg(long)]
        live: bool,
    },
    /// Remove a reference, or a module or manifest by digest; blobs go when unreferenced.
    Rm {
        /// A reference or a `sha256:<hex>` digest.
        target: String,
    },
    /// Print an Istio WasmPlugin that loads a module as the daemon holds it (asking the
    /// daemon for it first), pinned by digest.
    Wasmplugin {
        /// `[oci://]registry[:port]/repository[:tag][@sha256:<hex>]`.
        reference: String,
        /// The WasmPlugin's name.
        #[arg(long)]
        name: String,
        /// Its namespace [default: kubectl's current namespace].
        #[arg(long)]
        namespace: Option<String>,
        /// A label of the workloads it applies to (repeatable) [default: every workload of the
        /// namespace].
        #[arg(long = "selector", value_name = "KEY=VALUE")]
        selectors: Vec<String>,
        /// How the proxy loads the module: `http` the daemon's module API (any packaging),
        /// `oci` its OCI view (wasme artifacts), `file` the module file (pinned first; the
        /// proxy mounts the cache directory).
        #[arg(long, value_enum, default_value_t = Via::Http)]
        via: Via,
        /// `host[:port]` that reaches the node's daemon, for `oci` and `http` URLs.
        #[arg(long, default_value = wasmplugin::DEFAULT_DAEMON_ADDRESS)]
        daemon_address: String,
    },
}

/// `--via` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Via {
    Oci,
    Http,
    File,
}

/// `push --format` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum PushFormat {
    Cncf,
    Wasme,
}

/// `--pull-policy` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Policy {
    IfNotPresent,
    Always,
    Never,
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Serve => "info",
        _ => "warn",
    };
    let filter = cli.log.as_deref().unwrap_or(default_log);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir_named = cli.config.data_dir.is_some();
    let config = Config::resolve(cli.config)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve => runtime.block_on(wasmcache::daemon::run(config, shutdown_signal()))?,
        Command::Pull { reference, json } => runtime.block_on(pull(config, &reference, json))?,
        Command::Inspect { target, json } => {
            let inspection = if Path::new(&target).is_file() {
                inspect_file(Path::new(&target))?
            } else {
                runtime.block_on(inspect_reference(config, data_dir_named, &target))?
            };
            if json {
                println!("{}", serde_json::to_string(&inspection)?);
            } else {
                print!("{}", inspection.render());
            }
        }
        Command::Push {
            file,
            reference,
            format,
            abi_versions,
            root_ids,
            annotations,
            json,
        } => {
            let options = wasmcache::push::Options {
                packaging: match format {
                    PushFormat::Cncf => wasmcache::push::Packaging::Cncf,
                    PushFormat::Wasme => wasmcache::push::Packaging::Wasme,
                },
                abi_versions,
                root_ids,
                annotations: wasmcache::push::parse_annotations(&annotations)?,
            };
            runtime.block_on(push(config, &file, &reference, &options, json))?;
        }
        Command::Health { live } => {
            let socket = config.socket_path();
            let serving = runtime.block_on(client::health(&socket))?;
            if serving {
                println!("ready");
            } else if live {
                println!("alive, not ready");
            } else {
                anyhow::bail!("the daemon at {} is not ready", socket.display());
            }
        }
        Command::Fetch {
            reference,
            pull_policy,
            sha256,
            json,
        } => {
            let policy = match pull_policy {
                Policy::IfNotPresent => PullPolicy::IfNotPresent,
                Policy::Always => PullPolicy::Always,
                Policy::Never => PullPolicy::Never,
            };
            let socket = config.socket_path();
            let expected = sha256.unwrap_or_default();
            let fetched = runtime.block_on(client::fetch_expecting(
                &socket, reference, policy, expected,
            ))?;
            print_fetched(&fetched, json)?;
        }
        Command::Prefetch {
            mut references,
            files,
            pin,
        } => {
            let mut bad_lines = 0;
            for file in &files {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading prefetch list {}", file.display()))?;
                let (entries, bad) = wasmcache::prefetch::parse_list(&text, file);
                for line in &bad {
                    eprintln!("{}:{}: {}", line.file.display(), line.line, line.reason);
                }
                bad_lines += bad.len();
                references.extend(entries.into_iter().map(|e| e.reference.to_string()));
            }
            if references.is_empty() && bad_lines == 0 {
                anyhow::bail!("nothing to prefetch: name references or --file lists");
            }
            let failed =
                runtime.block_on(progress::prefetch(&config.socket_path(), references, pin))?;
            if failed + bad_lines > 0 {
                anyhow::bail!("{} of the references failed", failed + bad_lines);
            }
        }
        Command::Pin { reference } => {
            let pinned = runtime.block_on(client::pin(&config.socket_path(), reference, true))?;
            println!("pinned: {} ({})", pinned.reference, pinned.digest);
        }
        Command::Unpin { reference } => {
            let unpinned =
                runtime.block_on(client::pin(&config.socket_path(), reference, false))?;
            println!("unpinned: {}", unpinned.reference);
        }
        Command::Verify { repair } => {
            let report = match Cache::choose(&config, data_dir_named)? {
                Cache::Local(store) => {
                    let report = store.verify(repair)?;
                    (
                        report.checked,
                        report.bad.iter().map(ToString::to_string).collect(),
                        report.repaired,
                    )
                }
                Cache::Daemon(socket) => {
                    let report = runtime.block_on(client::verify(&socket, repair))?;
                    (report.checked, report.bad, report.repaired)
                }
            };
            let (checked, bad, repaired): (u64, Vec<String>, u64) = report;
            for digest in &bad {
                println!("bad: {digest}{}", if repair { " (removed)" } else { "" });
            }
            println!(
                "checked {checked} blobs: {} bad, {repaired} removed",
                bad.len()
            );
            if !bad.is_empty() && !repair {
                anyhow::bail!(
                    "{} blobs do not match their digest; run `wasmcache verify --repair`",
                    bad.len()
                );
            }
        }
        Command::Gc => {
            let evicted: Vec<(String, u64, String)> = match Cache::choose(&config, data_dir_named)?
            {
                Cache::Local(store) => store
                    .evict(&config.budget(), 0)?
                    .into_iter()
                    .map(|e| (e.digest.to_string(), e.size, e.reason.as_str().to_owned()))
                    .collect(),
                Cache::Daemon(socket) => runtime
                    .block_on(client::gc(&socket))?
                    .evicted
                    .into_iter()
                    .map(|e| (e.digest, e.size, e.reason))
                    .collect(),
            };
            for (digest, size, reason) in &evicted {
                println!("evicted: {digest} {size} bytes ({reason})");
            }
            println!("{} modules evicted", evicted.len());
        }
        Command::Du { json } => {
            let mark = |ratio: f64| (config.max_cache_bytes as f64 * ratio) as u64;
            let usage = match Cache::choose(&config, data_dir_named)? {
                Cache::Local(store) => {
                    let usage = store.usage()?;
                    wasmcache::api::proto::UsageResponse {
                        bytes: usage.bytes,
                        modules: usage.modules,
                        max_cache_bytes: config.max_cache_bytes,
                        high_watermark_bytes: mark(config.cache_high_watermark),
                        low_watermark_bytes: mark(config.cache_low_watermark),
                    }
                }
                // The daemon's own budget, which may differ from this command's config.
                Cache::Daemon(socket) => runtime.block_on(client::usage(&socket))?,
            };
            if json {
                let value = serde_json::json!({
                    "bytes": usage.bytes,
                    "modules": usage.modules,
                    "max_cache_bytes": usage.max_cache_bytes,
                    "high_watermark_bytes": usage.high_watermark_bytes,
                    "low_watermark_bytes": usage.low_watermark_bytes,
                });
                println!("{value}");
            } else {
                println!(
                    "{} bytes in {} modules; budget {} bytes ({:.1}% used; eviction from {} down to {})",
                    usage.bytes,
                    usage.modules,
                    usage.max_cache_bytes,
                    usage.bytes as f64 * 100.0 / usage.max_cache_bytes.max(1) as f64,
                    usage.high_watermark_bytes,
                    usage.low_watermark_bytes,
                );
            }
        }
        Command::Stat { target, json } => {
            let entries = runtime.block_on(client::stat(&config.socket_path(), target))?;
            print_entries(&entries, json)?;
        }
        Command::Ls { json } => match Cache::choose(&config, data_dir_named)? {
            Cache::Local(store) => print_entries(&store.list()?, json)?,
            Cache::Daemon(socket) => {
                let entries = runtime.block_on(client::list(&socket))?;
                print_entries(&entries, json)?;
            }
        },
        Command::Rm { target } => match Cache::choose(&config, data_dir_named)? {
            Cache::Local(store) => {
                let removed = remove(&store, &target)?;
                print_removed(&removed, &target, &config.data_dir.display().to_string())?;
            }
            Cache::Daemon(socket) => {
                let removed = runtime.block_on(client::remove(&socket, target.clone()))?;
                let place = format!("the daemon at {}", socket.display());
                print_removed(&removed, &target, &place)?;
            }
        },
        Command::Wasmplugin {
            reference,
            name,
            namespace,
            selectors,
            via,
            daemon_address,
        } => {
            let metadata = wasmplugin::Metadata::parse(name, namespace, &selectors)?;
            let daemon_address = wasmplugin::DaemonAddress::parse(&daemon_address)?;
            let via = match via {
                Via::Oci => wasmplugin::Via::Oci,
                Via::Http => wasmplugin::Via::Http,
                Via::File => wasmplugin::Via::File,
            };
            let plugin = runtime.block_on(wasm_plugin(
                &config,
                &reference,
                metadata,
                via,
                &daemon_address,
            ))?;
            print!("{}", wasmplugin::render(&plugin));
        }
    }
    Ok(())
}

/// `wasmplugin`: the daemon's answer for `reference`, then the pin a `file` URL needs.
async fn wasm_plugin(
    config: &Config,
    reference: &str,
    metadata: wasmplugin::Metadata,
    via: wasmplugin::Via,
    daemon_address: &wasmplugin::DaemonAddress,
) -> anyhow::Result<WasmPlugin> {
    let parsed: Reference = reference.parse()?;
    let socket = config.socket_path();
    let fetched = client::fetch(&socket, reference.to_owned(), PullPolicy::IfNotPresent).await?;
    let source = wasmplugin::source(
        via,
        &parsed,
        &fetched,
        &config.registry_aliases,
        daemon_address,
    )?;
    if let Some(pin) = &source.pin {
        let pinned = client::pin(&socket, pin.to_string(), true).await?;
        eprintln!("pinned: {} ({})", pinned.reference, pinned.digest);
    }
    Ok(WasmPlugin {
        metadata,
        url: source.url,
        sha256: source.sha256,
        comments: source.notes,
    })
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Where `ls`, `rm`, `gc`, `du`, `verify` and `inspect` act.
enum Cache {
    /// The cache directory itself (no daemon holds it).
    Local(Store),
    /// The daemon listening on this socket.
    Daemon(std::path::PathBuf),
}

impl Cache {
    /// The one place that decides between the local cache and a daemon: a socket the user
    /// named (flag, environment or config file) without a data dir means that daemon; else
    /// the data dir's cache, or the daemon at the socket when a daemon holds the cache. A
    /// data dir that holds no cache is never created by these commands: without one, the
    /// daemon at the socket is asked (and an unreachable one is an error naming it).
    fn choose(config: &Config, data_dir_named: bool) -> anyhow::Result<Cache> {
        match Cache::find(config, data_dir_named)? {
            Some(cache) => Ok(cache),
            None => anyhow::bail!(
                "no cache at {} and no daemon at {}; name the daemon's socket with --socket \
                 or a cache with --data-dir",
                config.data_dir.display(),
                config.socket_path().display()
            ),
        }
    }

    /// [`Cache::choose`], with `None` when there is neither a cache at the data dir nor a
    /// socket (`inspect` then pulls into a new cache, as `pull` does).
    fn find(config: &Config, data_dir_named: bool) -> anyhow::Result<Option<Cache>> {
        let socket = config.socket_path();
        if config.socket.is_some() && !data_dir_named {
            return Ok(Some(Cache::Daemon(socket)));
        }
        if !Store::exists(&config.data_dir) {
            return Ok(socket.exists().then_some(Cache::Daemon(socket)));
        }
        match Store::open(&config.data_dir) {
            Ok(store) => Ok(Some(Cache::Local(store))),
            Err(wasmcache::store::Error::Locked { .. }) => Ok(Some(Cache::Daemon(socket))),
            Err(error) => Err(error.into()),
        }
    }
}

fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(Store::open(&config.data_dir)?)
}

async fn pull(config: Config, reference: &str, json: bool) -> anyhow::Result<()> {
    let reference: Reference = reference.parse()?;
    let fetched = pull_into(config, None, &reference).await?;
    print_fetched(&fetched, json)
}

/// Pulls `reference` into `store` (the data dir's, opened here when `None`) without a daemon.
async fn pull_into(
    config: Config,
    store: Option<Store>,
    reference: &Reference,
) -> anyhow::Result<Fetched> {
    let metrics = wasmcache::metrics::Metrics::default();
    // The registry client loads the system's CA roots while the store opens.
    let registry = {
        let (config, metrics) = (config.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || {
            wasmcache::registry::RegistryClient::new(&config, metrics)
        })
    };
    let store = match store {
        Some(store) => store,
        None => open_store(&config)?,
    };
    let registry = registry.await.context("building the registry client")??;
    let fetcher = Fetcher::new(registry, store, Arc::new(config), metrics);
    fetcher.load_signature_policies()?;
    let fetched = fetcher.pull(reference).await?;
    Ok(wasmcache::store::Fetched {
        signature: fetcher.signature_status(&fetched),
        ..fetched
    })
}

/// `inspect FILE`.
fn inspect_file(path: &Path) -> anyhow::Result<Inspection> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the module {}", path.display()))?;
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    Inspection::of(&bytes, path.clone(), None, None)
        .with_context(|| format!("inspecting the module {}", path.display()))
}

/// `inspect REF`: what the daemon or the data dir caches for `target`, pulled when it is not
/// cached (through the daemon when there is one).
async fn inspect_reference(
    config: Config,
    data_dir_named: bool,
    target: &str,
) -> anyhow::Result<Inspection> {
    let reference: Reference = target.parse()?;
    let (fetched, bytes, manifest) = match Cache::find(&config, data_dir_named)? {
        Some(Cache::Daemon(socket)) => read_from_daemon(&socket, &reference).await?,
        Some(Cache::Local(store)) => read_from_store(config, store, &reference).await?,
        None => {
            let store = open_store(&config)?;
            read_from_store(config, store, &reference).await?
        }
    };
    Inspection::of(
        &bytes,
        fetched.path.clone(),
        Some(&fetched),
        manifest.as_deref(),
    )
    .with_context(|| format!("inspecting the module {} of {target}", fetched.digest))
}

/// A module for `inspect`: the fetch answer, the module's bytes and the manifest as published
/// when the cache keeps it.
type Inspected = (Fetched, Vec<u8>, Option<Vec<u8>>);

/// What the daemon caches for `reference`, fetched through it when it holds nothing.
async fn read_from_daemon(socket: &Path, reference: &Reference) -> anyhow::Result<Inspected> {
    let fetched = match client::stat(socket, reference.to_string()).await {
        Ok(entries) if !entries.is_empty() => entries.into_iter().next().unwrap(),
        Err(error) if error.code() != Some(tonic::Code::NotFound) => return Err(error.into()),
        _ => client::fetch(socket, reference.to_string(), PullPolicy::IfNotPresent).await?,
    };
    // The file when this process may read it, else the bytes over the socket.
    let bytes = match std::fs::read(&fetched.path) {
        Ok(bytes) if Digest::of(&bytes) == fetched.digest => bytes,
        _ => client::read_module(socket, &fetched.digest).await?,
    };
    let manifest = match reference.url() {
        Some(_) => None,
        None => client::kept_document(socket, reference, &fetched.manifest_digest)
            .await
            .unwrap_or_else(|error| {
                let error = wasmcache::fetch::error_chain(&error);
                tracing::debug!(%error, "no manifest annotations from the daemon");
                None
            }),
    };
    Ok((fetched, bytes, manifest))
}

/// What `store` caches for `reference`, whatever its age, pulled into it when it holds
/// nothing.
async fn read_from_store(
    config: Config,
    store: Store,
    reference: &Reference,
) -> anyhow::Result<Inspected> {
    let fetched = match store.lookup_reference(&reference.to_string())? {
        Some(fetched) => fetched,
        None => pull_into(config, Some(store.clone()), reference).await?,
    };
    let path = &fetched.path;
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the module {}", path.display()))?;
    if Digest::of(&bytes) != fetched.digest {
        anyhow::bail!(
            "the module file {} does not hash to {}; run `wasmcache verify --repair`",
            path.display(),
            fetched.digest
        );
    }
    let manifest = store.document(&fetched.manifest_digest.to_string())?;
    Ok((fetched, bytes, manifest))
}

async fn push(
    config: Config,
    file: &std::path::Path,
    reference: &str,
    options: &wasmcache::push::Options,
    json: bool,
) -> anyhow::Result<()> {
    let reference: Reference = reference.parse()?;
    let metrics = wasmcache::metrics::Metrics::default();
    let registry = tokio::task::spawn_blocking(move || {
        wasmcache::registry::RegistryClient::new(&config, metrics)
    });
    let registry = registry.await.context("building the registry client")??;
    let pushed = wasmcache::push::push_module(&registry, file, &reference, options).await?;
    if json {
        println!("{}", serde_json::to_string(&pushed)?);
    } else {
        println!("{}", pushed.manifest_digest);
    }
    Ok(())
}

fn print_fetched(fetched: &Fetched, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(fetched)?);
    } else {
        println!("{}", fetched.path.display());
    }
    Ok(())
}

fn print_entries(entries: &[Fetched], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(&entries)?);
        return Ok(());
    }
    println!(
        "{:<60} {:<20} {:>10}  FORMAT",
        "REFERENCE", "DIGEST", "SIZE"
    );
    for entry in entries {
        let digest = entry.digest.to_string();
        println!(
            "{:<60} {:<20} {:>10}  {}",
            entry.reference,
            &digest[..19],
            entry.size,
            entry.format
        );
    }
    Ok(())
}

fn remove(store: &Store, target: &str) -> anyhow::Result<Removed> {
    Ok(if target.starts_with("sha256:") {
        store.remove_digest(&target.parse::<Digest>()?)?
    } else {
        let reference: Reference = target.parse()?;
        store.remove_reference(&reference.to_string())?
    })
}

fn print_removed(removed: &Removed, target: &str, place: &str) -> anyhow::Result<()> {
    if removed.references.is_empty() && removed.modules.is_empty() {
        anyhow::bail!("'{target}' is not in the cache at {place}");
    }
    for reference in &removed.references {
        println!("untagged: {reference}");
    }
    for module in &removed.modules {
        println!("deleted: {module}");
    }
    Ok(())
}

/// Most glibc malloc arenas. glibc gives threads up to eight arenas per core, and each keeps
/// the memory freed into it; the daemon's threads (async workers, blocking file I/O) allocate
/// little, so two arenas hold its resident size down at no measurable cost in speed.
const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`] before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}
