//! Tests of the configuration: defaults, the sample file, parsing and validation.

use super::*;

#[test]
fn defaults_are_valid() {
    Config::default().validate().unwrap();
}

#[test]
fn sample_file_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("wasmcache.toml");
    let sample = Config::from_file(&path).unwrap();
    let defaults = Config::default();
    assert_eq!(sample.insecure_registries, defaults.insecure_registries);
    assert_eq!(sample.connect_timeout, defaults.connect_timeout);
    assert_eq!(sample.read_timeout, defaults.read_timeout);
    assert_eq!(sample.fetch_timeout, defaults.fetch_timeout);
    assert_eq!(sample.stale_after, defaults.stale_after);
    assert_eq!(sample.validate_wasm, defaults.validate_wasm);
    assert_eq!(sample.require_proxy_wasm, defaults.require_proxy_wasm);
    assert_eq!(sample.tag_ttl, defaults.tag_ttl);
    assert_eq!(sample.socket_mode, defaults.socket_mode);
    assert_eq!(
        sample.socket_send_buffer_bytes,
        defaults.socket_send_buffer_bytes
    );
    assert_eq!(sample.header_read_timeout, defaults.header_read_timeout);
    assert_eq!(sample.idle_timeout, defaults.idle_timeout);
    assert_eq!(sample.worker_threads, defaults.worker_threads);
    assert_eq!(sample.shutdown_grace, defaults.shutdown_grace);
    assert_eq!(sample.wasme_listen, defaults.wasme_listen);
    assert_eq!(sample.oci_fetch_through, defaults.oci_fetch_through);
    assert_eq!(sample.prefetch_concurrency, defaults.prefetch_concurrency);
    assert_eq!(
        sample.prefetch_download_share,
        defaults.prefetch_download_share
    );
    assert_eq!(sample.max_cache_bytes, defaults.max_cache_bytes);
    assert_eq!(sample.cache_high_watermark, defaults.cache_high_watermark);
    assert_eq!(sample.cache_low_watermark, defaults.cache_low_watermark);
    assert_eq!(sample.max_age, defaults.max_age);
    assert_eq!(sample.path_grace, defaults.path_grace);
    assert_eq!(sample.max_lease, defaults.max_lease);
    assert_eq!(sample.gc_interval, defaults.gc_interval);
    assert_eq!(sample.prefetch_retries, defaults.prefetch_retries);
    assert_eq!(sample.refresh_interval, defaults.refresh_interval);
    assert_eq!(sample.ready_after_prefetch, defaults.ready_after_prefetch);
    assert_eq!(sample.trusted_token_realms, defaults.trusted_token_realms);
    assert_eq!(sample.blocked_cidrs, defaults.blocked_cidrs);
    assert_eq!(sample.registry_mirrors, defaults.registry_mirrors);
    assert_eq!(sample.mirror_headers, defaults.mirror_headers);
    assert_eq!(
        sample.max_concurrent_downloads,
        defaults.max_concurrent_downloads
    );
    assert_eq!(
        format!("{:?}", sample.limits),
        format!("{:?}", defaults.limits)
    );
    assert_eq!(
        format!("{:?}", sample.peers),
        format!("{:?}", defaults.peers)
    );
}

#[test]
fn unknown_keys_are_named() {
    let error = toml::from_str::<Config>("data_dir = \"/x\"\nmax_modul_bytes = 3\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("max_modul_bytes"), "{error}");
}

#[test]
fn durations_and_limits_parse() {
    let config: Config =
        toml::from_str("read_timeout = \"2m\"\n[limits]\nmax_module_bytes = 1024\n").unwrap();
    assert_eq!(config.read_timeout, Duration::from_secs(120));
    assert_eq!(config.limits.max_module_bytes, 1024);
    assert_eq!(config.limits.max_layer_bytes, DEFAULT_MAX_LAYER_BYTES);
}

#[test]
fn registry_policy_patterns() {
    let mut config = Config::default();
    assert!(config.registry_allowed("anything.io"));
    config.allowed_registries = vec!["*.example.com".into(), "127.0.0.1:5000".into()];
    config.blocked_registries = vec!["evil.example.com".into()];
    assert!(config.registry_allowed("ghcr.example.com"));
    assert!(config.registry_allowed("127.0.0.1:5000"));
    assert!(!config.registry_allowed("example.com"));
    assert!(!config.registry_allowed("notexample.com"));
    assert!(!config.registry_allowed("evil.example.com"));
    assert!(!config.registry_allowed("127.0.0.1:5001"));
}

#[test]
fn validation_names_the_field() {
    let mut config = Config::default();
    config.limits.max_module_bytes = 0;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("limits.max_module_bytes"), "{error}");

    let mut config = Config {
        worker_threads: 0,
        ..Config::default()
    };
    config
        .validate()
        .expect("0 worker threads means one per CPU");
    config.worker_threads = MAX_WORKER_THREADS + 1;
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("worker_threads") && error.contains("513"),
        "{error}"
    );
}

#[test]
fn prefetch_download_share_is_checked_and_leaves_permits_to_on_demand_fetches() {
    let defaults = Config::default();
    assert_eq!(defaults.prefetch_download_permits(), 4);
    assert!(defaults.prefetch_download_permits() < defaults.max_concurrent_downloads);
    for (share, downloads, permits) in [
        (0.5, 8, 4),
        (0.5, 2, 1),
        (0.5, 1, 1),
        (0.25, 3, 1),
        (0.75, 8, 6),
        (1.0, 8, 8),
    ] {
        let config = Config {
            prefetch_download_share: share,
            max_concurrent_downloads: downloads,
            ..Config::default()
        };
        config.validate().unwrap();
        assert_eq!(
            config.prefetch_download_permits(),
            permits,
            "{share} of {downloads}"
        );
    }
    for bad in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        let config = Config {
            prefetch_download_share: bad,
            ..Config::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("prefetch_download_share") && error.contains(&format!("= {bad}:")),
            "{error}"
        );
    }
    let config: Config = toml::from_str("prefetch_download_share = 0.25\n").unwrap();
    assert_eq!(config.prefetch_download_share, 0.25);
}

#[test]
fn blocked_cidrs_default_to_metadata_addresses_and_are_checked() {
    let defaults = Config::default();
    assert_eq!(defaults.blocked_cidrs, DEFAULT_BLOCKED_CIDRS);
    let config: Config =
        toml::from_str("blocked_cidrs = [\"10.0.0.0/8\", \"100.100.100.200\"]\n").unwrap();
    config.validate().unwrap();
    let off: Config = toml::from_str("blocked_cidrs = []\n").unwrap();
    assert!(off.blocked_cidrs.is_empty());
    off.validate().unwrap();
    for bad in ["169.254.0.0/33", "metadata.google.internal", ""] {
        let config = Config {
            blocked_cidrs: vec!["fe80::/10".into(), bad.into()],
            ..Config::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("blocked_cidrs") && error.contains(&format!("= {bad}:")),
            "{error}"
        );
    }
}

#[test]
fn tcp_reads_parse_and_need_the_token() {
    let config: Config = toml::from_str("tcp_reads = \"cached\"\n").unwrap();
    assert_eq!(config.tcp_reads, TcpReads::Cached);
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("tcp_reads") && error.contains("tcp_token_file"),
        "{error}"
    );
    let config: Config =
        toml::from_str("tcp_reads = \"token\"\ntcp_token_file = \"/t\"\n").unwrap();
    assert_eq!(config.tcp_reads, TcpReads::Token);
    assert!(config.validate().is_ok());
    assert_eq!(Config::default().tcp_reads, TcpReads::Open);
    assert!(toml::from_str::<Config>("tcp_reads = \"closed\"\n").is_err());
}
