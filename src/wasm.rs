//! What a module's bytes say about it: core module or component, what it imports from the
//! host (grouped by import module: `env`, `wasi_snapshot_preview1`, …), what it exports, and
//! the proxy-wasm ABI versions it speaks.
//!
//! Pure: it reads the bytes it is given and nothing else, and never validates (that is
//! `fetch`'s job, with `validate_modules`); only the header and the import and export sections
//! are decoded, the other sections are walked over. Reading a module from the cache or a
//! registry is the caller's.
//!
//! A proxy-wasm filter declares the ABI it was built against by exporting an empty function
//! named `proxy_abi_version_<major>_<minor>_<patch>`: the spec's versions are
//! `proxy_abi_version_0_1_0`, `proxy_abi_version_0_2_0` and `proxy_abi_version_0_2_1`, and
//! hosts (Envoy's proxy-wasm-cpp-host, ngx_wasm_module) pick the ABI by which of these a
//! module exports.

use std::collections::BTreeMap;

use serde::Serialize;
use wasmparser::{Encoding, Parser, Payload, WasmFeatures};

/// Wasm binary magic number.
const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// The export name prefix that declares a proxy-wasm ABI version.
const PROXY_ABI_EXPORT_PREFIX: &str = "proxy_abi_version_";

/// Why bytes could not be read as WebAssembly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes do not start with the Wasm magic number.
    #[error("not WebAssembly: the bytes do not start with the `\\0asm` magic number")]
    NotWasm,
    /// The header or a section could not be decoded.
    #[error("malformed WebAssembly at byte {offset}")]
    Malformed {
        /// Where decoding failed.
        offset: u64,
        /// What the decoder found.
        #[source]
        source: wasmparser::BinaryReaderError,
    },
}

/// Whether the bytes are a core module or a component (the component model's binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A core WebAssembly module (what proxy-wasm hosts load).
    Core,
    /// A component.
    Component,
}

/// What [`analyse`] found in a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleInfo {
    /// Core module or component.
    pub kind: Kind,
    /// A core module's imports: item names by import module, in the order of the import
    /// section. A component imports whole instances or items by name (`wasi:cli/environment@0.2.0`):
    /// each is a key with no items.
    pub imports: BTreeMap<String, Vec<String>>,
    /// Export names, in the order of the export section (the component's own, for a component).
    pub exports: Vec<String>,
    /// The proxy-wasm ABI versions the module exports, `major.minor.patch`, sorted and unique;
    /// empty for anything but a proxy-wasm filter (components included).
    pub proxy_wasm_abi: Vec<String>,
}

/// Reads the header, imports and exports of a core module or component, without validating
/// it. Sections of nested modules and components are skipped: only the outer ones count.
pub fn analyse(bytes: &[u8]) -> Result<ModuleInfo, Error> {
    if !bytes.starts_with(WASM_MAGIC) {
        return Err(Error::NotWasm);
    }
    let malformed = |source: wasmparser::BinaryReaderError| Error::Malformed {
        offset: source.offset(),
        source,
    };
    let mut parser = Parser::new(0);
    // Decoding only, so every proposal's encoding (compact imports, …) is accepted.
    parser.set_features(WasmFeatures::all());
    let mut kind = Kind::Core;
    let mut imports: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut exports = Vec::new();
    // How deep inside nested modules and components the parser is; 0 is the outer one.
    let mut depth = 0usize;
    for payload in parser.parse_all(bytes) {
        match payload.map_err(malformed)? {
            Payload::Version { encoding, .. } if depth == 0 => {
                kind = match encoding {
                    Encoding::Module => Kind::Core,
                    Encoding::Component => Kind::Component,
                };
            }
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ImportSection(reader) if depth == 0 => {
                for import in reader.into_imports() {
                    let import = import.map_err(malformed)?;
                    imports
                        .entry(import.module.to_owned())
                        .or_default()
                        .push(import.name.to_owned());
                }
            }
            Payload::ExportSection(reader) if depth == 0 => {
                for export in reader {
                    exports.push(export.map_err(malformed)?.name.to_owned());
                }
            }
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    imports
                        .entry(import.map_err(malformed)?.name.name.to_owned())
                        .or_default();
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    exports.push(export.map_err(malformed)?.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    let proxy_wasm_abi = match kind {
        Kind::Core => abi_versions(&exports),
        Kind::Component => Vec::new(),
    };
    Ok(ModuleInfo {
        kind,
        imports,
        exports,
        proxy_wasm_abi,
    })
}

/// The proxy-wasm ABI versions `bytes` exports (see [`analyse`]); empty when they cannot be
/// read.
pub fn proxy_wasm_abi(bytes: &[u8]) -> Vec<String> {
    analyse(bytes)
        .map(|info| info.proxy_wasm_abi)
        .unwrap_or_default()
}

/// The versions of a wasme config's `abiVersions` that the module does not export, as the
/// config writes them, in its order.
///
/// The comparison is loose, as configs are written by hand: a version counts when it is three
/// decimal numbers separated by `.` or `_`, optionally after `v` or `proxy_abi_version_`
/// (`v0.2.1`, `0.2.1`, `0_2_1` and `proxy_abi_version_0_2_1` all mean 0.2.1), and it is
/// claimed when no exported version has the same three numbers. Anything else is not
/// compared: wasme's own versions name the envoy-wasm commit of the ABI
/// (`v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f`), which says nothing a module exports, so
/// they never count as a mismatch.
pub fn unclaimed_abi(config_abi_versions: &[String], exported: &[String]) -> Vec<String> {
    let exported: Vec<[u32; 3]> = exported.iter().filter_map(|v| loose_version(v)).collect();
    config_abi_versions
        .iter()
        .filter(|claimed| loose_version(claimed).is_some_and(|v| !exported.contains(&v)))
        .cloned()
        .collect()
}

/// The ABI versions declared by `exports`, sorted by number and unique.
fn abi_versions(exports: &[String]) -> Vec<String> {
    let mut versions: Vec<[u32; 3]> = exports
        .iter()
        .filter_map(|name| name.strip_prefix(PROXY_ABI_EXPORT_PREFIX))
        .filter_map(|rest| three_numbers(rest, '_'))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    versions
        .iter()
        .map(|[major, minor, patch]| format!("{major}.{minor}.{patch}"))
        .collect()
}

/// `x.y.z` (or `x_y_z`) after an optional `v` or `proxy_abi_version_`, as [`unclaimed_abi`]
/// reads versions.
fn loose_version(text: &str) -> Option<[u32; 3]> {
    let text = text.trim();
    let bare = text
        .strip_prefix(PROXY_ABI_EXPORT_PREFIX)
        .or_else(|| text.strip_prefix(['v', 'V']))
        .unwrap_or(text);
    three_numbers(bare, '.').or_else(|| three_numbers(bare, '_'))
}

/// Exactly three decimal numbers separated by `separator`.
fn three_numbers(text: &str, separator: char) -> Option<[u32; 3]> {
    let mut parts = text.split(separator);
    let mut number = || {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let version = [number()?, number()?, number()?];
    parts.next().is_none().then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wat(text: &str) -> Vec<u8> {
        wat::parse_str(text).expect("test WAT")
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// A filter as the proxy-wasm SDKs build it: the ABI marker, callbacks, host calls in
    /// `env` and WASI in `wasi_snapshot_preview1`.
    const FILTER_0_2_1: &str = r#"(module
        (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
        (import "env" "proxy_get_header_map_value"
            (func (param i32 i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "fd_write"
            (func (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "proxy_abi_version_0_2_1"))
        (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
        (func (export "proxy_on_context_create") (param i32 i32))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 0))"#;

    #[test]
    fn reads_a_proxy_wasm_filter() {
        let info = analyse(&wat(FILTER_0_2_1)).unwrap();
        assert_eq!(info.kind, Kind::Core);
        assert_eq!(
            info.imports,
            BTreeMap::from([
                (
                    "env".to_owned(),
                    strings(&["proxy_log", "proxy_get_header_map_value"])
                ),
                ("wasi_snapshot_preview1".to_owned(), strings(&["fd_write"])),
            ])
        );
        assert_eq!(
            info.exports,
            strings(&[
                "memory",
                "proxy_abi_version_0_2_1",
                "proxy_on_vm_start",
                "proxy_on_context_create",
                "proxy_on_request_headers",
            ])
        );
        assert_eq!(info.proxy_wasm_abi, strings(&["0.2.1"]));
        assert_eq!(proxy_wasm_abi(&wat(FILTER_0_2_1)), strings(&["0.2.1"]));
    }

    #[test]
    fn a_plain_wasi_module_speaks_no_proxy_wasm_abi() {
        let bytes = wat(r#"(module
            (import "wasi_snapshot_preview1" "fd_write"
                (func (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
            (memory (export "memory") 1)
            (func (export "_start")))"#);
        let info = analyse(&bytes).unwrap();
        assert_eq!(info.kind, Kind::Core);
        assert_eq!(
            info.imports,
            BTreeMap::from([(
                "wasi_snapshot_preview1".to_owned(),
                strings(&["fd_write", "proc_exit"])
            )])
        );
        assert_eq!(info.exports, strings(&["memory", "_start"]));
        assert!(info.proxy_wasm_abi.is_empty());
        assert!(proxy_wasm_abi(&bytes).is_empty());
    }

    #[test]
    fn lists_every_abi_a_module_exports_in_order() {
        let bytes = wat(r#"(module
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0)
            (func (export "proxy_abi_version_0_1_0"))
            (func (export "proxy_abi_version_x_y_z"))
            (func (export "proxy_abi_version_0_2")))"#);
        assert_eq!(proxy_wasm_abi(&bytes), strings(&["0.1.0", "0.2.1"]));
    }

    #[test]
    fn reads_a_component_and_not_its_inner_modules() {
        let bytes = wat(r#"(component
            (import "wasi:cli/environment@0.2.0" (instance))
            (import "host" (func $host))
            (core func $log (canon lower (func $host)))
            (core module $inner
                (import "env" "proxy_log" (func))
                (func (export "proxy_abi_version_0_2_1")))
            (core instance $env (export "proxy_log" (func $log)))
            (core instance (instantiate $inner (with "env" (instance $env))))
            (export "run" (func $host)))"#);
        let info = analyse(&bytes).unwrap();
        assert_eq!(info.kind, Kind::Component);
        let imported: Vec<&str> = info.imports.keys().map(String::as_str).collect();
        assert_eq!(imported, ["host", "wasi:cli/environment@0.2.0"]);
        assert!(info.imports.values().all(Vec::is_empty));
        assert_eq!(info.exports, strings(&["run"]));
        assert!(info.proxy_wasm_abi.is_empty());
    }

    #[test]
    fn a_component_header_alone_is_a_component() {
        let info = analyse(b"\0asm\x0d\0\x01\0").unwrap();
        assert_eq!(info.kind, Kind::Component);
        assert!(info.imports.is_empty() && info.exports.is_empty());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(analyse(b"not wasm at all"), Err(Error::NotWasm)));
        assert!(matches!(analyse(b""), Err(Error::NotWasm)));
        // The magic, then an unknown version.
        assert!(matches!(
            analyse(b"\0asm\x07\0\0\0"),
            Err(Error::Malformed { .. })
        ));
        // A section that claims more bytes than there are.
        let mut truncated = wat(FILTER_0_2_1);
        truncated.truncate(truncated.len() - 3);
        assert!(matches!(analyse(&truncated), Err(Error::Malformed { .. })));
        assert!(proxy_wasm_abi(&truncated).is_empty());
    }

    #[test]
    fn unclaimed_abi_compares_loosely() {
        let exported = strings(&["0.2.1"]);
        let claimed = |config: &[&str]| unclaimed_abi(&strings(config), &exported);
        for same in [
            "0.2.1",
            "v0.2.1",
            "V0.2.1",
            "0_2_1",
            "proxy_abi_version_0_2_1",
            " 0.2.1 ",
        ] {
            assert!(claimed(&[same]).is_empty(), "{same}");
        }
        assert_eq!(claimed(&["v0.1.0", "0.2.1"]), strings(&["v0.1.0"]));
        assert_eq!(claimed(&["0.2.0", "v0.1.0"]), strings(&["0.2.0", "v0.1.0"]));
        // wasme's commit-named versions and anything else without x.y.z are not compared.
        for unknown in [
            "v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f",
            "v0-4689a30309abf31aee9ae36e73d34b1bb182685f",
            "v0.2",
            "0.2.1-rc1",
            "",
        ] {
            assert!(claimed(&[unknown]).is_empty(), "{unknown}");
        }
        // Against a module that exports no ABI, every recognisable version is unclaimed.
        assert_eq!(
            unclaimed_abi(&strings(&["v0.2.1"]), &[]),
            strings(&["v0.2.1"])
        );
    }
}
