//! The `wasmcache` command: parses flags, sets up logging, and runs one subcommand.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use wasmcache::config::ConfigArgs;
use wasmcache::{Config, Digest, Fetched, Fetcher, Reference, Store};

/// A node-local cache for WebAssembly modules stored in OCI registries.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log filter (tracing's env-filter syntax, e.g. `info` or `wasmcache=debug`).
    #[arg(long, env = "WASMCACHE_LOG", default_value = "warn", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull a module into the cache (no daemon needed) and print its path.
    Pull {
        /// `[oci://]registry[:port]/repository[:tag][@sha256:<hex>]`.
        reference: String,
        /// Print one JSON object instead of the path.
        #[arg(long)]
        json: bool,
    },
    /// List cached references and modules.
    Ls {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove a reference, or a module or manifest by digest; blobs go when unreferenced.
    Rm {
        /// A reference or a `sha256:<hex>` digest.
        target: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
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
    let config = Config::resolve(cli.config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Pull { reference, json } => runtime.block_on(pull(config, &reference, json)),
        Command::Ls { json } => list(&config, json),
        Command::Rm { target } => remove(&config, &target),
    }
}

fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(Store::open(&config.data_dir)?)
}

async fn pull(config: Config, reference: &str, json: bool) -> anyhow::Result<()> {
    let reference: Reference = reference.parse()?;
    let store = open_store(&config)?;
    let registry = wasmcache::registry::RegistryClient::new(&config)?;
    let fetcher = Fetcher::new(registry, store, Arc::new(config));
    let fetched = fetcher.pull(&reference).await?;
    if json {
        println!("{}", serde_json::to_string(&fetched)?);
    } else {
        println!("{}", fetched.path.display());
    }
    Ok(())
}

fn list(config: &Config, json: bool) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let entries: Vec<Fetched> = wasmcache::fetch::list(&store)?;
    if json {
        println!("{}", serde_json::to_string(&entries)?);
        return Ok(());
    }
    println!(
        "{:<60} {:<20} {:>10}  FORMAT",
        "REFERENCE", "DIGEST", "SIZE"
    );
    for entry in entries {
        println!(
            "{:<60} {:<20} {:>10}  {}",
            entry.reference,
            &entry.digest.to_string()[..19],
            entry.size,
            entry.format
        );
    }
    Ok(())
}

fn remove(config: &Config, target: &str) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let removed = if target.starts_with("sha256:") {
        store.remove_digest(&target.parse::<Digest>()?)?
    } else {
        let reference: Reference = target.parse()?;
        store.remove_reference(&reference.to_string())?
    };
    if removed.references.is_empty() && removed.modules.is_empty() {
        anyhow::bail!(
            "'{target}' is not in the cache at {}",
            config.data_dir.display()
        );
    }
    for reference in &removed.references {
        println!("untagged: {reference}");
    }
    for module in &removed.modules {
        println!("deleted: {module}");
    }
    Ok(())
}
