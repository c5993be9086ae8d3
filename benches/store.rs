//! The store's write path and the hashing ceiling under it.
//!
//! - `store_commit/{1,50} MiB`: `Store::begin_ingest`, the bytes written through
//!   `std::io::Write` in 256 KiB chunks (the size the pull pipeline writes), then
//!   `Store::commit` with the expected digest and a no-op check: hash, write, fsync, chmod,
//!   rename, directory fsync. The blob is deleted after each iteration, outside the timing, so
//!   every commit really renames instead of finding the blob already there.
//! - `write_fsync/50 MiB`: the same bytes written to a plain file and fsynced, without hashing:
//!   what the disk alone costs.
//! - `digest_of/50 MiB`: `Digest::of` on a buffer in memory, the most a single-threaded sha256
//!   can do here.
//!
//! Throughput is in bytes per second. Run with `cargo bench --bench store`.

use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use wasmcache::digest::Digest;
use wasmcache::store::{Error, Store};

/// Buffer sizes for the commit bench.
const SIZES: [usize; 2] = [1 << 20, 50 << 20];
/// The chunk size the pull pipeline hands to `Ingest::write`.
const CHUNK: usize = 256 << 10;

/// Deterministic, incompressible-looking bytes (xorshift64*).
fn buffer(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

fn label(len: usize) -> String {
    format!("{} MiB", len >> 20)
}

fn store_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("store dir");
    let store = Store::open(dir.path()).expect("opening the store");
    let mut group = c.benchmark_group("store_commit");
    group.sampling_mode(SamplingMode::Flat);
    for len in SIZES {
        let bytes = buffer(len, len as u64);
        let expected = Digest::of(&bytes);
        group.throughput(Throughput::Bytes(len as u64));
        if len > 4 << 20 {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(3));
        } else {
            group
                .sample_size(30)
                .measurement_time(Duration::from_secs(5));
        }
        group.bench_with_input(
            BenchmarkId::from_parameter(label(len)),
            &bytes,
            |b, bytes| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let started = Instant::now();
                        let mut ingest = store.begin_ingest(len as u64).expect("begin_ingest");
                        for chunk in bytes.chunks(CHUNK) {
                            ingest.write_all(chunk).expect("ingest write");
                        }
                        let (digest, size) = store
                            .commit(ingest, Some(&expected), |_| Ok::<(), Error>(()))
                            .expect("commit");
                        total += started.elapsed();
                        assert_eq!(size, len as u64);
                        assert!(store.delete_blob(&digest).expect("deleting the blob"));
                    }
                    total
                });
            },
        );
    }
    group.finish();
}

fn write_fsync(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("scratch dir");
    let len = 50 << 20;
    let bytes = buffer(len, 7);
    let path = dir.path().join("plain");
    let mut group = c.benchmark_group("write_fsync");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(len as u64));
    group.bench_function(label(len), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let mut file = File::create(&path).expect("creating the file");
                for chunk in bytes.chunks(CHUNK) {
                    file.write_all(chunk).expect("writing");
                }
                file.sync_all().expect("fsync");
                total += started.elapsed();
                drop(file);
                std::fs::remove_file(&path).expect("removing the file");
            }
            total
        });
    });
    group.finish();
}

fn digest_of(c: &mut Criterion) {
    let len = 50 << 20;
    let bytes = buffer(len, 11);
    let mut group = c.benchmark_group("digest_of");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(len as u64));
    group.bench_function(label(len), |b| {
        b.iter(|| Digest::of(black_box(&bytes)));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = store_commit, write_fsync, digest_of
}
criterion_main!(benches);
