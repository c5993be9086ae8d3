//! Test WebAssembly modules of any size and their digests.
//!
//! A module is the smallest valid one exporting `add(i32, i32) -> i32`, optionally followed by a
//! custom section of seeded pseudo-random bytes, so size and content are both under the test's
//! control and the result still validates.

use sha2::{Digest, Sha256};

/// The 41-byte module exporting `add(i32, i32) -> i32`.
const ADD_MODULE: [u8; 41] = [
    0x00, 0x61, 0x73, 0x6d, // magic "\0asm"
    0x01, 0x00, 0x00, 0x00, // version 1
    0x01, 0x07, 0x01, 0x60, 0x02, 0x7f, 0x7f, 0x01, 0x7f, // type: (i32, i32) -> i32
    0x03, 0x02, 0x01, 0x00, // function: one function of type 0
    0x07, 0x07, 0x01, 0x03, b'a', b'd', b'd', 0x00, 0x00, // export "add" = function 0
    0x0a, 0x09, 0x01, 0x07, 0x00, 0x20, 0x00, 0x20, 0x01, 0x6a,
    0x0b, // code: local.get 0 1; i32.add
];

/// The name of the padding custom section.
const PAD_SECTION: &[u8] = b"pad";

/// A valid module; with `extra > 0` it carries a custom section "pad" of `extra` bytes derived
/// from `seed`, so different seeds give different modules (with `extra == 0` the seed is unused).
pub fn module(extra: usize, seed: u64) -> Vec<u8> {
    let mut bytes = ADD_MODULE.to_vec();
    if extra == 0 {
        return bytes;
    }
    let mut name = Vec::new();
    write_leb128(&mut name, PAD_SECTION.len() as u64);
    name.extend_from_slice(PAD_SECTION);
    bytes.reserve(extra + name.len() + 11);
    bytes.push(0x00);
    write_leb128(&mut bytes, (name.len() + extra) as u64);
    bytes.extend_from_slice(&name);
    pseudo_random_bytes(&mut bytes, extra, seed);
    bytes
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The OCI digest `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// Appends unsigned LEB128.
fn write_leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends `count` bytes of xorshift64* output; the seed goes through splitmix64 so that seed 0
/// and neighbouring seeds give unrelated streams.
fn pseudo_random_bytes(out: &mut Vec<u8>, count: usize, seed: u64) {
    let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    state = (state ^ (state >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    state = (state ^ (state >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    state ^= state >> 31;
    if state == 0 {
        state = 1;
    }
    let mut remaining = count;
    while remaining > 0 {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        let take = remaining.min(8);
        out.extend_from_slice(&word[..take]);
        remaining -= take;
    }
}
