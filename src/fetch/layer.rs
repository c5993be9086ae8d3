//! Getting a layer's bytes into an ingest file: raw modules are copied, tar and tar+gzip
//! layers are decompressed and `plugin.wasm` (or a lone `*.wasm`) is copied out of them. An
//! HTTP source's body is told apart by its first bytes ([`unbox`]).
//!
//! Everything here is blocking and runs on a blocking thread, fed by [`ChannelReader`] with
//! the chunks the async side receives from the registry. Reading is bounded (decompressed
//! bytes, module size), only regular files are looked at, and entries whose path climbs out of
//! the archive root are ignored: nothing from a layer is written anywhere but the ingest file.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use super::{Error, Result};
use crate::store::{self, Ingest};

/// The file name Istio's `docker build` flow puts the module under.
const PLUGIN_FILE_NAME: &str = "plugin.wasm";
/// How many file names of a layer an error message lists.
const MAX_FILES_REPORTED: usize = 20;
/// Wasm binary magic number.
const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// How much of an HTTP source's body is looked at to tell what it is.
const SNIFF_BYTES: usize = 512;
/// gzip's magic number.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Where a tar header holds its `ustar` magic.
const TAR_MAGIC: std::ops::Range<usize> = 257..262;
/// How an HTTP source's body is named in errors.
const BODY: &str = "the body";
/// Version field of a core module.
const WASM_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];
/// Version and layer fields of a component.
const WASM_COMPONENT_VERSION: [u8; 4] = [0x0d, 0, 1, 0];

/// An ingest plus what validating its module needs, gathered as the bytes go past.
pub(super) struct ModuleIngest {
    /// The temp file being written.
    pub(super) ingest: Ingest,
    /// The module's sections for validation.
    pub(super) sections: WasmSections,
}

impl ModuleIngest {
    /// Wraps `ingest`; with `validate`, every section but custom ones is kept for wasmparser.
    pub(super) fn new(ingest: Ingest, validate: bool) -> ModuleIngest {
        ModuleIngest {
            ingest,
            sections: WasmSections::new(validate),
        }
    }

    fn write_all(&mut self, bytes: &[u8], name: &str) -> Result<()> {
        self.ingest
            .write_all(bytes)
            .map_err(|error| ingest_error(error, &self.ingest, name))?;
        self.sections.feed(bytes);
        Ok(())
    }
}

/// Copies a raw module layer into the ingest.
pub(super) fn write_raw(
    reader: &mut ChannelReader,
    mut module: ModuleIngest,
    name: &str,
) -> Result<ModuleIngest> {
    let mut buffer = vec![0; 256 << 10];
    loop {
        let n = reader.read(&mut buffer).expect("channel reads cannot fail");
        if n == 0 {
            return Ok(module);
        }
        module.write_all(&buffer[..n], name)?;
    }
}

fn ingest_error(error: io::Error, ingest: &Ingest, name: &str) -> Error {
    if Ingest::is_limit_error(&error) {
        Error::ModuleTooLarge {
            reference: name.to_owned(),
            size: ingest.written() + 1,
            limit: ingest.limit(),
        }
    } else {
        Error::Store {
            reference: name.to_owned(),
            source: store::Error::Io {
                action: "write",
                path: PathBuf::from("an ingest file"),
                source: error,
            },
        }
    }
}

/// Finds the module in a tar layer and copies it into `ingest`.
///
/// Returns `Ok(None)` when the layer holds no module (the caller tries the next layer). The
/// rest of the layer is drained so the network side can verify its digest.
pub(super) fn extract(
    reader: &mut ChannelReader,
    new_ingest: &dyn Fn() -> Result<ModuleIngest>,
    gzip: bool,
    name: &str,
    layer: &str,
    limits: &crate::config::Limits,
) -> Result<Option<ModuleIngest>> {
    let limit = limits.max_layer_bytes;
    let result = {
        let decoded: Box<dyn Read + '_> = if gzip {
            Box::new(flate2::read::GzDecoder::new(&mut *reader))
        } else {
            Box::new(&mut *reader)
        };
        let limited = LimitedReader {
            inner: decoded,
            remaining: limit,
        };
        find_module(
            tar::Archive::new(limited),
            new_ingest,
            name,
            layer,
            limits.max_tar_entries,
        )
    };
    match result {
        Err(Error::Layer { source, .. }) if is_read_limit(&source) => Err(Error::LayerTooLarge {
            reference: name.to_owned(),
            layer: layer.to_owned(),
            limit,
        }),
        other => other,
    }
}

/// Gets the module out of an HTTP source's body, told by its first bytes: a gzip is opened
/// (once; decompressed bytes bounded by `max_layer_bytes`), a tar is searched as an image
/// layer is (`plugin.wasm`, else its one `*.wasm`), anything else is taken as the module
/// itself (checked as Wasm before it is committed).
pub(super) fn unbox(
    reader: &mut ChannelReader,
    new_ingest: &dyn Fn() -> Result<ModuleIngest>,
    name: &str,
    limits: &crate::config::Limits,
) -> Result<Option<ModuleIngest>> {
    let body_error = |source| Error::Layer {
        reference: name.to_owned(),
        layer: BODY.to_owned(),
        source,
    };
    let (head, rest) = sniff(reader).map_err(body_error)?;
    let result = if head.starts_with(&GZIP_MAGIC) {
        let decoded = LimitedReader {
            inner: flate2::read::GzDecoder::new(io::Cursor::new(head).chain(rest)),
            remaining: limits.max_layer_bytes,
        };
        match sniff(decoded) {
            Ok((head, rest)) => tar_or_module(head, rest, new_ingest, name, limits),
            Err(source) => Err(body_error(source)),
        }
    } else {
        tar_or_module(head, rest, new_ingest, name, limits)
    };
    match result {
        Err(Error::Layer { source, .. }) if is_read_limit(&source) => Err(Error::LayerTooLarge {
            reference: name.to_owned(),
            layer: BODY.to_owned(),
            limit: limits.max_layer_bytes,
        }),
        other => other,
    }
}

/// Reads up to [`SNIFF_BYTES`] of `reader`; returns them and the reader, positioned after.
fn sniff<R: Read>(mut reader: R) -> io::Result<(Vec<u8>, R)> {
    let mut head = vec![0; SNIFF_BYTES];
    let mut filled = 0;
    while filled < SNIFF_BYTES {
        match reader.read(&mut head[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    head.truncate(filled);
    Ok((head, reader))
}

/// A tar (by its header's magic) searched for the module, or the module itself.
fn tar_or_module<R: Read>(
    head: Vec<u8>,
    rest: R,
    new_ingest: &dyn Fn() -> Result<ModuleIngest>,
    name: &str,
    limits: &crate::config::Limits,
) -> Result<Option<ModuleIngest>> {
    let is_tar = head.get(TAR_MAGIC).is_some_and(|magic| magic == b"ustar");
    let mut reader = io::Cursor::new(head).chain(rest);
    if is_tar {
        let archive = tar::Archive::new(reader);
        return find_module(archive, new_ingest, name, BODY, limits.max_tar_entries);
    }
    let mut module = new_ingest()?;
    let mut buffer = vec![0; 256 << 10];
    loop {
        let n = reader.read(&mut buffer).map_err(|source| Error::Layer {
            reference: name.to_owned(),
            layer: BODY.to_owned(),
            source,
        })?;
        if n == 0 {
            return Ok(Some(module));
        }
        module.write_all(&buffer[..n], name)?;
    }
}

fn find_module<R: Read>(
    mut archive: tar::Archive<R>,
    new_ingest: &dyn Fn() -> Result<ModuleIngest>,
    name: &str,
    layer: &str,
    max_entries: usize,
) -> Result<Option<ModuleIngest>> {
    let layer_error = |source| Error::Layer {
        reference: name.to_owned(),
        layer: layer.to_owned(),
        source,
    };
    let mut files = Vec::new();
    let mut wasm_files: Vec<String> = Vec::new();
    // A lone `*.wasm` is kept as a candidate; `plugin.wasm` wins over it, a second one
    // makes the layer ambiguous.
    let mut candidate = None;
    for (count, entry) in archive.entries().map_err(layer_error)?.enumerate() {
        if count >= max_entries {
            return Err(Error::TooManyTarEntries {
                reference: name.to_owned(),
                layer: layer.to_owned(),
                limit: max_entries,
            });
        }
        let mut entry = entry.map_err(layer_error)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().map_err(layer_error)?.into_owned();
        let Some(path) = safe_path(&path) else {
            debug!(path = %path.display(), "ignoring tar entry outside the archive root");
            continue;
        };
        let display = path.display().to_string();
        if files.len() < MAX_FILES_REPORTED {
            files.push(display.clone());
        }
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if base == PLUGIN_FILE_NAME {
            let mut ingest = new_ingest()?;
            copy_entry(&mut entry, &mut ingest, name, layer)?;
            return Ok(Some(ingest));
        }
        if !base.ends_with(".wasm") {
            continue;
        }
        wasm_files.push(display);
        candidate = match wasm_files.len() {
            1 => {
                let mut ingest = new_ingest()?;
                copy_entry(&mut entry, &mut ingest, name, layer)?;
                Some(ingest)
            }
            _ => None,
        };
    }
    match wasm_files.len() {
        0 => Err(Error::NoModule {
            reference: name.to_owned(),
            layers: layer.to_owned(),
            files: files.join(", "),
        }),
        1 => Ok(candidate),
        _ => Err(Error::AmbiguousModule {
            reference: name.to_owned(),
            layer: layer.to_owned(),
            files: wasm_files.join(", "),
        }),
    }
}

fn copy_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    module: &mut ModuleIngest,
    name: &str,
    layer: &str,
) -> Result<()> {
    let mut buffer = vec![0; 256 << 10];
    loop {
        let n = entry.read(&mut buffer).map_err(|source| Error::Layer {
            reference: name.to_owned(),
            layer: layer.to_owned(),
            source,
        })?;
        if n == 0 {
            return Ok(());
        }
        module.write_all(&buffer[..n], name)?;
    }
}

/// The entry's path relative to the archive root, or `None` if it is absolute or climbs out
/// of it (neither is ever taken as the module).
fn safe_path(path: &Path) -> Option<PathBuf> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!clean.as_os_str().is_empty()).then_some(clean)
}

/// Checks the magic number and version, then (when enabled) validates the module from the
/// sections gathered while it was written, so the file is never read back.
pub(super) fn check_wasm(sections: WasmSections, name: &str) -> Result<()> {
    let not_wasm = |reason: String| Error::NotWasm {
        reference: name.to_owned(),
        digest: "(being stored)".to_owned(),
        reason,
    };
    let header = &sections.kept[..sections.kept.len().min(8)];
    if header.len() < 8 || &header[..4] != WASM_MAGIC {
        return Err(not_wasm(format!(
            "does not start with the Wasm magic number 00 61 73 6d (first bytes: {})",
            hex::encode(header)
        )));
    }
    let version: [u8; 4] = header[4..].try_into().expect("four bytes");
    if version != WASM_MODULE_VERSION && version != WASM_COMPONENT_VERSION {
        return Err(not_wasm(format!(
            "unknown binary version {}",
            hex::encode(version)
        )));
    }
    if !sections.validate {
        return Ok(());
    }
    match sections.state {
        SectionState::Id => {}
        SectionState::Invalid(reason) => return Err(not_wasm(reason)),
        _ => return Err(not_wasm("the module ends inside a section".into())),
    }
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
        .validate_all(&sections.kept)
        .map_err(|error| not_wasm(format!("validation failed: {error}")))?;
    Ok(())
}

/// The check a downloaded module gets (magic number, version, wasmparser validation), for a
/// module from elsewhere (one about to be pushed), fed its bytes as they are read.
pub struct ModuleCheck {
    sections: WasmSections,
}

impl Default for ModuleCheck {
    fn default() -> ModuleCheck {
        ModuleCheck {
            sections: WasmSections::new(true),
        }
    }
}

impl ModuleCheck {
    /// Takes the module's next bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.sections.feed(bytes);
    }

    /// The verdict on everything fed: the module without its custom sections (what was
    /// validated), or [`Error::NotWasm`] saying why `name` is not WebAssembly.
    pub fn finish(self, name: &str) -> Result<Vec<u8>> {
        let kept = self.sections.kept.clone();
        check_wasm(self.sections, name)?;
        Ok(kept)
    }
}

/// What validation needs of a module streaming past: its header and every section except
/// custom ones, which are skipped by their length (they carry no code, and are often the bulk
/// of a large module).
pub(super) struct WasmSections {
    validate: bool,
    kept: Vec<u8>,
    state: SectionState,
}

/// Where the section reader is in the byte stream.
enum SectionState {
    Header,
    Id,
    Size {
        id: u8,
        value: u64,
        shift: u32,
        raw: Vec<u8>,
    },
    Body {
        keep: bool,
        remaining: u64,
    },
    Invalid(String),
}

impl WasmSections {
    fn new(validate: bool) -> WasmSections {
        WasmSections {
            validate,
            kept: Vec::new(),
            state: SectionState::Header,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            match &mut self.state {
                SectionState::Header => {
                    let n = (8 - self.kept.len()).min(bytes.len() - at);
                    self.kept.extend_from_slice(&bytes[at..at + n]);
                    at += n;
                    if self.kept.len() == 8 {
                        if !self.validate {
                            return;
                        }
                        self.state = SectionState::Id;
                    }
                }
                SectionState::Id => {
                    self.state = SectionState::Size {
                        id: bytes[at],
                        value: 0,
                        shift: 0,
                        raw: Vec::new(),
                    };
                    at += 1;
                }
                SectionState::Size {
                    id,
                    value,
                    shift,
                    raw,
                } => {
                    let byte = bytes[at];
                    at += 1;
                    raw.push(byte);
                    if *shift > 28 {
                        self.state =
                            SectionState::Invalid("a section size is not a valid u32".into());
                        continue;
                    }
                    *value |= u64::from(byte & 0x7f) << *shift;
                    *shift += 7;
                    if byte & 0x80 == 0 {
                        let keep = *id != 0;
                        if keep {
                            self.kept.push(*id);
                            self.kept.extend_from_slice(raw);
                        }
                        self.state = match *value {
                            0 => SectionState::Id,
                            remaining => SectionState::Body { keep, remaining },
                        };
                    }
                }
                SectionState::Body { keep, remaining } => {
                    let n = (*remaining).min((bytes.len() - at) as u64) as usize;
                    if *keep {
                        self.kept.extend_from_slice(&bytes[at..at + n]);
                    }
                    *remaining -= n as u64;
                    at += n;
                    if *remaining == 0 {
                        self.state = SectionState::Id;
                    }
                }
                SectionState::Invalid(_) => return,
            }
        }
    }
}

/// A blocking `Read` over chunks sent from the async side.
pub(super) struct ChannelReader {
    receiver: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    pub(super) fn new(receiver: mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader {
            receiver,
            current: Bytes::new(),
        }
    }

    /// Consumes whatever is still coming so the sender can finish its stream.
    pub(super) fn drain(&mut self) {
        while self.receiver.blocking_recv().is_some() {}
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buffer.len().min(self.current.len());
        buffer[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Fails reads once more than `remaining` bytes have come out of `inner`.
struct LimitedReader<R> {
    inner: R,
    remaining: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("read limit reached")]
struct ReadLimit;

/// Whether `error` was raised by a [`LimitedReader`] running out.
fn is_read_limit(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<ReadLimit>().is_some())
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buffer)?;
        if n as u64 > self.remaining {
            return Err(io::Error::other(ReadLimit));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::store::Store;
    use proptest::prelude::*;

    /// `bytes` as the chunks the network side would send, and the limits tests run with.
    fn feed(bytes: &[u8]) -> (ChannelReader, Limits) {
        let (sender, receiver) = mpsc::channel(bytes.len() / 512 + 2);
        for chunk in bytes.chunks(512) {
            sender
                .try_send(Bytes::copy_from_slice(chunk))
                .expect("channel sized for every chunk");
        }
        let limits = Limits {
            max_layer_bytes: 1 << 20,
            max_tar_entries: 100,
            ..Limits::default()
        };
        (ChannelReader::new(receiver), limits)
    }

    /// Ingests of at most 1 MiB in `store`.
    fn new_ingest(store: &Store) -> impl Fn() -> Result<ModuleIngest> + '_ {
        || {
            store
                .begin_ingest(1 << 20)
                .map(|ingest| ModuleIngest::new(ingest, true))
                .map_err(|source| Error::Store {
                    reference: "test".into(),
                    source,
                })
        }
    }

    /// Runs `extract` over `bytes` as a layer, as the download path does.
    fn run_extract(store: &Store, bytes: &[u8], gzip: bool) -> Result<Option<ModuleIngest>> {
        let (mut reader, limits) = feed(bytes);
        let new_ingest = new_ingest(store);
        extract(
            &mut reader,
            &new_ingest,
            gzip,
            "test",
            "sha256:layer",
            &limits,
        )
    }

    /// Runs `unbox` over `bytes` as an HTTP source's body.
    fn run_unbox(store: &Store, bytes: &[u8]) -> Result<Option<ModuleIngest>> {
        let (mut reader, limits) = feed(bytes);
        unbox(&mut reader, &new_ingest(store), "test", &limits)
    }

    #[test]
    fn http_bodies_are_told_apart_by_their_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let module = module_with_custom_section(2_000);
        let gzip = |bytes: &[u8]| {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(bytes).unwrap();
            encoder.finish().unwrap()
        };
        let tar = tar_with(&[
            ("README", tar::EntryType::Regular, b"docs"),
            ("filters/auth.wasm", tar::EntryType::Regular, &module),
        ]);
        for (kind, body) in [
            ("raw", module.clone()),
            ("gzip", gzip(&module)),
            ("tar", tar.clone()),
            ("tar+gzip", gzip(&tar)),
        ] {
            let ModuleIngest { ingest, sections } = run_unbox(&store, &body).unwrap().unwrap();
            assert_eq!(ingest.written(), module.len() as u64, "{kind}");
            check_wasm(sections, "test").unwrap();
        }
        let no_wasm = tar_with(&[("README", tar::EntryType::Regular, b"docs")]);
        let error = run_unbox(&store, &no_wasm).err().unwrap();
        assert!(matches!(error, Error::NoModule { .. }), "{error}");
        let bomb = gzip(&vec![0; 2 << 20]);
        let error = run_unbox(&store, &bomb).err().unwrap();
        assert!(
            matches!(
                error,
                Error::LayerTooLarge { .. } | Error::ModuleTooLarge { .. }
            ),
            "{error}"
        );
        let ModuleIngest { sections, .. } = run_unbox(&store, b"<html>").unwrap().unwrap();
        assert!(check_wasm(sections, "test").is_err());
    }

    /// Everything under the store's root, relative.
    fn tree(root: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path.clone());
                }
                found.push(path.strip_prefix(root).unwrap().to_owned());
            }
        }
        found
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            // Written raw: `set_path` refuses `..`, which is exactly what is tested here.
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            if *kind == tar::EntryType::Symlink {
                header.set_link_name("/etc/passwd").unwrap();
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn sections_of(bytes: &[u8], chunk: usize) -> WasmSections {
        let mut sections = WasmSections::new(true);
        for piece in bytes.chunks(chunk.max(1)) {
            sections.feed(piece);
        }
        sections
    }

    /// The 41-byte `add` module with a custom section of `padding` bytes in the middle.
    fn module_with_custom_section(padding: usize) -> Vec<u8> {
        let add: &[u8] = &[
            0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x07, 0x01, 0x60, 0x02, 0x7f,
            0x7f, 0x01, 0x7f, 0x03, 0x02, 0x01, 0x00, 0x07, 0x07, 0x01, 0x03, b'a', b'd', b'd',
            0x00, 0x00, 0x0a, 0x09, 0x01, 0x07, 0x00, 0x20, 0x00, 0x20, 0x01, 0x6a, 0x0b,
        ];
        let mut custom = vec![3, b'p', b'a', b'd'];
        custom.extend(std::iter::repeat_n(0xab, padding));
        let mut size = Vec::new();
        let mut value = custom.len();
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            size.push(if value == 0 { byte } else { byte | 0x80 });
            if value == 0 {
                break;
            }
        }
        let mut module = add[..21].to_vec();
        module.push(0);
        module.extend(size);
        module.extend(custom);
        module.extend(&add[21..]);
        module
    }

    #[test]
    fn streamed_sections_validate_without_keeping_custom_sections() {
        let module = module_with_custom_section(300_000);
        wasmparser::validate(&module).unwrap();
        for chunk in [1, 7, 4096, 1 << 20] {
            let sections = sections_of(&module, chunk);
            assert_eq!(
                sections.kept.len(),
                41,
                "custom section skipped (chunk {chunk})"
            );
            check_wasm(sections, "test").unwrap();
        }
        let truncated = &module[..module.len() - 3];
        let error = check_wasm(sections_of(truncated, 4096), "test").unwrap_err();
        assert!(error.to_string().contains("is not WebAssembly"), "{error}");
        let mut broken = module.clone();
        let last = broken.len() - 1;
        broken[last] = 0xff;
        let error = check_wasm(sections_of(&broken, 4096), "test").unwrap_err();
        assert!(error.to_string().contains("validation failed"), "{error}");
        let error = check_wasm(sections_of(b"#!/bin/sh\n", 4096), "test").unwrap_err();
        assert!(error.to_string().contains("magic number"), "{error}");
    }

    #[test]
    fn traversal_and_links_are_ignored_and_nothing_leaves_the_ingest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let before = tree(dir.path());
        let wasm = b"\0asm\x01\0\0\0";
        let layer = tar_with(&[
            ("../plugin.wasm", tar::EntryType::Regular, b"evil"),
            ("/plugin.wasm", tar::EntryType::Regular, b"absolute"),
            ("plugin.wasm", tar::EntryType::Symlink, b""),
            ("dist/filter.wasm", tar::EntryType::Regular, wasm),
        ]);
        let ModuleIngest { ingest, sections } =
            run_extract(&store, &layer, false).unwrap().unwrap();
        assert_eq!(
            ingest.written(),
            wasm.len() as u64,
            "only the relative regular file is taken"
        );
        check_wasm(sections, "test").unwrap();
        drop(ingest);
        assert_eq!(tree(dir.path()), before);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_layers_never_panic_or_write_outside_the_ingest(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            gzip in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let before = tree(dir.path());
            drop(run_extract(&store, &bytes, gzip));
            prop_assert_eq!(tree(dir.path()), before);
        }
    }
}
