//! Reading and writing the bundle metadata of an ONNX file.
//!
//! The metadata is one `metadata_props` entry ([`METADATA_KEY`]) of the ONNX `ModelProto`.
//! Models can hold hundreds of megabytes of weights, so reading the metadata streams over the
//! file and skips the graph without parsing it, and rewriting it copies the graph's bytes
//! verbatim: the weights are never decoded, and the graph cannot change by accident. Every
//! write goes to a temporary file in the destination directory and is renamed into place, so a
//! reader never sees a half-written model and a failure leaves the old file as it was.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use onnx_protobuf::{ModelProto, StringStringEntryProto};
use protobuf::rt::WireType;
use protobuf::{CodedInputStream, Message};

use crate::{BundleError, BundleMeta, METADATA_KEY};

/// Field number of `ModelProto.metadata_props` in onnx.proto.
const METADATA_FIELD: u32 = 14;
/// Field number of `ModelProto.graph`.
const GRAPH_FIELD: u32 = 7;

/// Names of a graph's inputs and outputs, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GraphIo {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

impl GraphIo {
    /// The graph's input and output names (initializers listed as inputs by old exporters are
    /// left out, since they are weights, not things a caller feeds).
    pub fn of(model: &ModelProto) -> Self {
        let Some(graph) = model.graph.as_ref() else {
            return Self::default();
        };
        let weights: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        Self {
            inputs: graph
                .input
                .iter()
                .filter(|v| !weights.contains(v.name.as_str()))
                .map(|v| v.name.clone())
                .collect(),
            outputs: graph.output.iter().map(|v| v.name.clone()).collect(),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn pb_err(path: &Path) -> impl FnOnce(protobuf::Error) -> BundleError + '_ {
    move |source| BundleError::Protobuf {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads and validates the bundle metadata of the ONNX file at `path`, without loading its
/// weights into memory.
pub fn read_meta(path: &Path) -> Result<BundleMeta, BundleError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let entries = scan_metadata(&mut CodedInputStream::from_buf_read(&mut reader), path)?;
    meta_from_entries(&entries, path)
}

/// Like [`read_meta`], for a model already in memory (the daemon hands the same bytes to ONNX
/// Runtime). `origin` names the source in error messages.
pub fn meta_from_bytes(bytes: &[u8], origin: &Path) -> Result<BundleMeta, BundleError> {
    let entries = scan_metadata(&mut CodedInputStream::from_bytes(bytes), origin)?;
    meta_from_entries(&entries, origin)
}

/// Like [`read_meta`], for a model already parsed (read once for its metadata and its graph).
/// `origin` names the source in error messages.
pub fn meta_of_model(model: &ModelProto, origin: &Path) -> Result<BundleMeta, BundleError> {
    meta_from_entries(&model.metadata_props, origin)
}

/// Parses a whole ONNX model (graph and weights).
pub fn read_model(path: &Path) -> Result<ModelProto, BundleError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    ModelProto::parse_from_reader(&mut reader).map_err(pb_err(path))
}

/// Stores `meta` under [`METADATA_KEY`] in a model being built, replacing any previous value
/// and keeping other metadata entries.
pub fn set_meta(model: &mut ModelProto, meta: &BundleMeta) {
    model.metadata_props.retain(|e| e.key != METADATA_KEY);
    model.metadata_props.push(entry(meta));
}

/// The metadata of an in-memory model, if it has any.
pub fn model_meta(model: &ModelProto) -> Option<Result<BundleMeta, BundleError>> {
    model
        .metadata_props
        .iter()
        .find(|e| e.key == METADATA_KEY)
        .map(|e| BundleMeta::from_json(&e.value))
}

/// Writes a whole model to `path` atomically (temporary file in the same directory, then
/// rename). Nothing is left at `path` if this fails.
pub fn write_model(path: &Path, model: &ModelProto) -> Result<(), BundleError> {
    write_atomically(path, |out| model.write_to_writer(out).map_err(pb_err(path)))
}

/// Replaces the bundle metadata of the ONNX file at `path` with `meta`, atomically. The graph
/// and every other field are copied byte for byte; other `metadata_props` entries are kept.
pub fn write_meta(path: &Path, meta: &BundleMeta) -> Result<(), BundleError> {
    meta.validate()?;
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    let (kept_ranges, mut kept_entries, saw_graph) = split_metadata(&bytes, path)?;
    if !saw_graph {
        return Err(BundleError::Metadata(format!(
            "{} holds no ONNX graph; refusing to write metadata into it",
            path.display()
        )));
    }
    kept_entries.retain(|e| e.key != METADATA_KEY);
    kept_entries.push(entry(meta));
    // Protobuf messages concatenate as a merge: repeated fields append. So the original fields
    // minus `metadata_props`, followed by a message holding only the new entries, is the
    // original model with its metadata replaced.
    let tail = ModelProto {
        metadata_props: kept_entries,
        ..ModelProto::default()
    };
    let tail = tail.write_to_bytes().map_err(pb_err(path))?;
    write_atomically(path, |out| {
        for range in &kept_ranges {
            out.write_all(&bytes[range.clone()]).map_err(io_err(path))?;
        }
        out.write_all(&tail).map_err(io_err(path))
    })
}

fn entry(meta: &BundleMeta) -> StringStringEntryProto {
    StringStringEntryProto {
        key: METADATA_KEY.to_owned(),
        value: meta.to_json(),
        ..Default::default()
    }
}

fn meta_from_entries(
    entries: &[StringStringEntryProto],
    path: &Path,
) -> Result<BundleMeta, BundleError> {
    // Later entries win, as when protobuf merges concatenated messages.
    let found = entries.iter().rev().find(|e| e.key == METADATA_KEY);
    match found {
        Some(e) => BundleMeta::from_json(&e.value),
        None => Err(BundleError::MissingMetadata {
            path: path.to_path_buf(),
            key: METADATA_KEY,
        }),
    }
}

/// Splits a tag into (field number, wire type), rejecting invalid wire types.
fn unpack_tag(tag: u32, path: &Path) -> Result<(u32, WireType), BundleError> {
    WireType::new(tag & 7)
        .map(|w| (tag >> 3, w))
        .ok_or_else(|| BundleError::Metadata(format!("{} is not an ONNX model", path.display())))
}

/// Collects the top-level `metadata_props` entries, skipping everything else.
fn scan_metadata(
    input: &mut CodedInputStream,
    path: &Path,
) -> Result<Vec<StringStringEntryProto>, BundleError> {
    let mut entries = Vec::new();
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(pb_err(path))? {
        let (field, wire) = unpack_tag(tag, path)?;
        if field == METADATA_FIELD && wire == WireType::LengthDelimited {
            entries.push(input.read_message().map_err(pb_err(path))?);
        } else {
            input.skip_field(wire).map_err(pb_err(path))?;
        }
    }
    Ok(entries)
}

type Split = (
    Vec<std::ops::Range<usize>>,
    Vec<StringStringEntryProto>,
    bool,
);

/// Returns the byte ranges of all top-level fields except `metadata_props`, the metadata
/// entries themselves, and whether a graph field was seen.
fn split_metadata(bytes: &[u8], path: &Path) -> Result<Split, BundleError> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
    let mut entries = Vec::new();
    let mut saw_graph = false;
    loop {
        let start = input.pos() as usize;
        let Some(tag) = input.read_raw_tag_or_eof().map_err(pb_err(path))? else {
            break;
        };
        let (field, wire) = unpack_tag(tag, path)?;
        if field == METADATA_FIELD && wire == WireType::LengthDelimited {
            entries.push(input.read_message().map_err(pb_err(path))?);
            continue;
        }
        saw_graph |= field == GRAPH_FIELD;
        input.skip_field(wire).map_err(pb_err(path))?;
        let end = input.pos() as usize;
        match ranges.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => ranges.push(start..end),
        }
    }
    Ok((ranges, entries, saw_graph))
}

/// Runs `write` against a temporary file beside `path`, flushes and syncs it, then renames it
/// over `path`. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomically<F>(path: &Path, write: F) -> Result<(), BundleError>
where
    F: FnOnce(&mut dyn Write) -> Result<(), BundleError>,
{
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".csg-export-")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(io_err(&dir))?;
    {
        let mut out = BufWriter::with_capacity(1 << 20, tmp.as_file());
        write(&mut out)?;
        out.flush().map_err(io_err(path))?;
    }
    // tempfile creates files only its owner can read, and a bundle is usually read by another
    // user (the daemon's service account): keep the mode of the file being replaced, or give
    // a new one the usual rw-r--r--.
    let permissions = match std::fs::metadata(path) {
        Ok(existing) => existing.permissions(),
        Err(_) => new_file_permissions(tmp.as_file()).map_err(io_err(path))?,
    };
    tmp.as_file()
        .set_permissions(permissions)
        .map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| BundleError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(unix)]
fn new_file_permissions(_: &std::fs::File) -> std::io::Result<std::fs::Permissions> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn new_file_permissions(file: &std::fs::File) -> std::io::Result<std::fs::Permissions> {
    Ok(file.metadata()?.permissions())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::tests::sample;
    use onnx_protobuf::{GraphProto, TensorProto};

    fn tiny_model() -> ModelProto {
        let weight = TensorProto {
            name: "w".into(),
            dims: vec![2],
            data_type: 1,
            raw_data: [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            ..Default::default()
        };
        ModelProto {
            ir_version: 8,
            producer_name: "test".into(),
            graph: Some(GraphProto {
                name: "g".into(),
                initializer: vec![weight],
                ..Default::default()
            })
            .into(),
            metadata_props: vec![StringStringEntryProto {
                key: "other".into(),
                value: "kept".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn metadata_round_trips_and_graph_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let mut model = tiny_model();
        let mut meta = sample();
        set_meta(&mut model, &meta);
        write_model(&path, &model).unwrap();
        assert_eq!(read_meta(&path).unwrap(), meta);

        meta.version = "2".into();
        meta.calibration = Some(crate::calibration::Calibration {
            thresholds: [("combined".to_string(), 3.5)].into(),
            ..Default::default()
        });
        write_meta(&path, &meta).unwrap();
        assert_eq!(read_meta(&path).unwrap(), meta);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(meta_from_bytes(&bytes, &path).unwrap(), meta);

        let back = read_model(&path).unwrap();
        assert_eq!(back.graph, tiny_model().graph);
        assert_eq!(back.producer_name, "test");
        let keys: Vec<&str> = back.metadata_props.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["other", METADATA_KEY]);
        assert_eq!(model_meta(&back).unwrap().unwrap(), meta);
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_metadata_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.onnx");
        write_model(&path, &tiny_model()).unwrap();
        let err = read_meta(&path).unwrap_err().to_string();
        assert!(
            err.contains(METADATA_KEY) && err.contains("plain.onnx"),
            "{err}"
        );
        assert_eq!(GraphIo::of(&read_model(&path).unwrap()), GraphIo::default());
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.onnx");
        let err = read_meta(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.onnx"), "{err}");

        let garbage = dir.path().join("garbage.onnx");
        std::fs::write(&garbage, [0xffu8; 64]).unwrap();
        assert!(read_meta(&garbage).is_err());
        let before = std::fs::read(&garbage).unwrap();
        assert!(write_meta(&garbage, &sample()).is_err());
        assert_eq!(std::fs::read(&garbage).unwrap(), before);
    }

    #[cfg(unix)]
    #[test]
    fn atomic_writes_are_readable_by_others_and_keep_an_existing_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.onnx");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        write_atomically(&path, |out| out.write_all(b"one").map_err(io_err(&path))).unwrap();
        assert_eq!(mode(&path), 0o644);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomically(&path, |out| out.write_all(b"two").map_err(io_err(&path))).unwrap();
        assert_eq!(mode(&path), 0o640);
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
    }
}
