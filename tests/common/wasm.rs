//! Test WebAssembly modules of any size and their digests: the smallest valid module exporting
//! `add(i32, i32) -> i32`, optionally followed by a custom section of seeded pseudo-random
//! bytes, so size and content are both under the test's control and the result validates.

use sha2::{Digest, Sha256};

/// The 41-byte module: magic, version, type, function, export "add" and code sections.
const ADD_MODULE: [u8; 41] = [
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x07, 0x01, 0x60, 0x02, 0x7f, 0x7f, 0x01,
    0x7f, 0x03, 0x02, 0x01, 0x00, 0x07, 0x07, 0x01, 0x03, b'a', b'd', b'd', 0x00, 0x00, 0x0a, 0x09,
    0x01, 0x07, 0x00, 0x20, 0x00, 0x20, 0x01, 0x6a, 0x0b,
];

/// A valid module; with `extra > 0` it carries a custom section "pad" of `extra` bytes derived
/// from `seed`, so different seeds give different modules (with `extra == 0` the seed is unused).
pub fn module(extra: usize, seed: u64) -> Vec<u8> {
    let mut bytes = ADD_MODULE.to_vec();
    if extra == 0 {
        return bytes;
    }
    pad_section_header(&mut bytes, extra);
    // xorshift64*, seeded through splitmix64 so that neighbouring seeds give unrelated streams.
    let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    state = (state ^ (state >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    state = (state ^ (state >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    state = (state ^ (state >> 31)).max(1);
    let end = bytes.len() + extra;
    while bytes.len() < end {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    bytes.truncate(end);
    bytes
}

/// A valid module of more than `extra` bytes that gzips to a few hundred (a custom section
/// of zeros).
pub fn compressible_module(extra: usize) -> Vec<u8> {
    let mut bytes = ADD_MODULE.to_vec();
    pad_section_header(&mut bytes, extra);
    bytes.resize(bytes.len() + extra, 0);
    bytes
}

/// Appends the header of a custom section named "pad" with `extra` bytes of content.
fn pad_section_header(bytes: &mut Vec<u8>, extra: usize) {
    bytes.push(0x00);
    // The section's length (unsigned LEB128), then the name "pad" with its length.
    let mut length = (4 + extra) as u64;
    while length >= 0x80 {
        bytes.push((length & 0x7f) as u8 | 0x80);
        length >>= 7;
    }
    bytes.push(length as u8);
    bytes.extend_from_slice(b"\x03pad");
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The OCI digest `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}
