//! Reader for `torch.save` checkpoints (the zip archive PyTorch has written since 1.6).
//!
//! The archive holds `<dir>/data.pkl`, a pickle whose tensors refer by key to raw storage files
//! `<dir>/data/<key>`. `candle_core::pickle` decodes the pickle and the tensor references; we
//! read each storage slice straight from the archive into an f32 buffer, one tensor at a time,
//! so the reader holds one copy of the weights (plus one tensor's raw bytes) and no more.
//! Accepted: the official CSG dict (`model_state_dict` → state dict) or a bare state dict,
//! keys with or without DataParallel's `module.` prefix.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::DType;
use candle_core::pickle::{Object, Stack, TensorInfo};
use zip::ZipArchive;
use zip::result::ZipError;

use crate::ExportError;
use crate::tensors::{Tensor, TensorMap, is_ignored};

/// The zip local-file-header signature every torch.save archive starts with.
const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";
/// Keys under which a training script's dict may hold the state dict.
const STATE_DICT_KEYS: [&str; 2] = ["model_state_dict", "state_dict"];

/// Whether the first bytes of a file are a zip archive's.
pub fn looks_like_zip(head: &[u8]) -> bool {
    head.starts_with(ZIP_MAGIC)
}

/// Describes the first bytes of a file that is not what we expected.
pub fn describe_head(head: &[u8]) -> String {
    match head {
        [] => "an empty file".into(),
        // Pickle protocol 2+ opens with PROTO (0x80); torch.save before 1.6 wrote raw pickles.
        [0x80, 2..=5, ..] => "a raw pickle (legacy torch.save before PyTorch 1.6, or \
                               _use_new_zipfile_serialization=False); re-save it with a current \
                               PyTorch"
            .into(),
        _ => {
            let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("a file starting with bytes {}", hex.join(" "))
        }
    }
}

fn archive_err(path: &Path) -> impl Fn(ZipError) -> ExportError + '_ {
    move |e| ExportError::Archive {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Reads every f32 tensor of the state dict in a torch.save archive, with `module.` stripped
/// and `num_batches_tracked` dropped.
pub fn read_torch(path: &Path) -> Result<TensorMap, ExportError> {
    let mut file = File::open(path).map_err(ExportError::io(path))?;
    let mut head = [0u8; 8];
    let n = read_up_to(&mut file, &mut head).map_err(ExportError::io(path))?;
    if !looks_like_zip(&head[..n]) {
        return Err(ExportError::UnknownFormat {
            path: path.to_path_buf(),
            expected: "a PyTorch checkpoint (torch.save zip archive, starting with \"PK\")",
            found: describe_head(&head[..n]),
        });
    }
    let file = File::open(path).map_err(ExportError::io(path))?;
    let mut zip = ZipArchive::new(BufReader::new(file)).map_err(archive_err(path))?;
    let pickle_name = find_pickle(&zip, path)?;
    check_byteorder(&mut zip, &pickle_name, path)?;
    let object = {
        let entry = zip.by_name(&pickle_name).map_err(archive_err(path))?;
        let mut reader = BufReader::new(entry);
        let mut stack = Stack::empty();
        let pickle_err = |e: candle_core::Error| ExportError::Pickle {
            path: path.to_path_buf(),
            entry: pickle_name.clone(),
            detail: e.to_string(),
        };
        stack.read_loop(&mut reader).map_err(pickle_err)?;
        stack.finalize().map_err(pickle_err)?
    };
    let dir = PathBuf::from(pickle_name.trim_end_matches(".pkl"));
    let infos = tensor_infos(object, &dir, path)?;
    let mut tensors = TensorMap::new();
    for info in infos {
        let name = info
            .name
            .strip_prefix("module.")
            .unwrap_or(&info.name)
            .to_owned();
        let tensor = read_tensor(&mut zip, &info, path)?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn find_pickle(zip: &ZipArchive<BufReader<File>>, path: &Path) -> Result<String, ExportError> {
    let names: Vec<&str> = zip.file_names().collect();
    match names.iter().find(|n| n.ends_with("data.pkl")) {
        Some(name) => Ok((*name).to_owned()),
        None => Err(ExportError::UnknownFormat {
            path: path.to_path_buf(),
            expected: "a torch.save archive holding <name>/data.pkl",
            found: format!(
                "a zip archive with entries {}",
                names.iter().take(5).copied().collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// Recent PyTorch records the byte order of the storages; everything we decode is
/// little-endian.
fn check_byteorder(
    zip: &mut ZipArchive<BufReader<File>>,
    pickle: &str,
    path: &Path,
) -> Result<(), ExportError> {
    let name = pickle.replace("data.pkl", "byteorder");
    let Ok(mut entry) = zip.by_name(&name) else {
        return Ok(());
    };
    let mut order = String::new();
    entry
        .read_to_string(&mut order)
        .map_err(ExportError::io(path))?;
    if order.trim() != "little" {
        return Err(ExportError::UnknownFormat {
            path: path.to_path_buf(),
            expected: "little-endian storages",
            found: format!("byteorder {:?}", order.trim()),
        });
    }
    Ok(())
}

/// Finds the state dict in the unpickled object and the tensor references in it.
fn tensor_infos(object: Object, dir: &Path, path: &Path) -> Result<Vec<TensorInfo>, ExportError> {
    let not_state_dict = |found: String| ExportError::NotStateDict {
        path: path.to_path_buf(),
        found,
    };
    let Object::Dict(mut entries) = object else {
        return Err(not_state_dict(describe(&object)));
    };
    let wrapped = entries.iter().position(
        |(k, _)| matches!(k, Object::Unicode(s) if STATE_DICT_KEYS.contains(&s.as_str())),
    );
    if let Some(pos) = wrapped {
        let (key, value) = entries.swap_remove(pos);
        entries = match value {
            Object::Dict(inner) => inner,
            other => {
                return Err(not_state_dict(format!(
                    "{} under {}",
                    describe(&other),
                    describe(&key)
                )));
            }
        };
    }
    let mut infos = Vec::new();
    let mut others = Vec::new();
    for (key, value) in entries {
        let Object::Unicode(name) = &key else {
            others.push(describe(&key));
            continue;
        };
        if is_ignored(name) {
            continue;
        }
        let name = name.clone();
        match value.into_tensor_info(key, dir) {
            Ok(Some(info)) => infos.push(info),
            Ok(None) => others.push(name),
            Err(e) => {
                return Err(ExportError::Pickle {
                    path: path.to_path_buf(),
                    entry: format!("tensor {name}"),
                    detail: e.to_string(),
                });
            }
        }
    }
    if infos.is_empty() {
        let keys: Vec<&str> = others.iter().take(6).map(String::as_str).collect();
        return Err(not_state_dict(format!(
            "a dict with no tensors (keys: {})",
            keys.join(", ")
        )));
    }
    Ok(infos)
}

/// A short description of a pickled object, for error messages.
fn describe(object: &Object) -> String {
    match object {
        Object::Int(v) => format!("the integer {v}"),
        Object::Long(v) => format!("the integer {v}"),
        Object::Float(v) => format!("the number {v}"),
        Object::Unicode(s) => format!("the string {s:?}"),
        Object::Bool(b) => format!("the boolean {b}"),
        Object::None => "None".into(),
        Object::Tuple(v) => format!("a tuple of {} items", v.len()),
        Object::List(v) => format!("a list of {} items", v.len()),
        Object::Dict(v) => format!("a dict of {} items", v.len()),
        Object::Class {
            module_name,
            class_name,
        } => format!("the class {module_name}.{class_name}"),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => match &**callable {
            Object::Class {
                module_name,
                class_name,
            } if module_name.starts_with("torch._utils") => {
                format!("a single tensor ({class_name})")
            }
            Object::Class {
                module_name,
                class_name,
            } => format!(
                "a pickled {module_name}.{class_name} object (torch.save(model) instead of \
                 torch.save(model.state_dict())?)"
            ),
            inner => describe(inner),
        },
        Object::PersistentLoad(_) => "a storage reference".into(),
        Object::Mark => "a pickle mark".into(),
    }
}

/// Reads one tensor's slice of its storage file as f32.
fn read_tensor(
    zip: &mut ZipArchive<BufReader<File>>,
    info: &TensorInfo,
    path: &Path,
) -> Result<Tensor, ExportError> {
    let shape = info.layout.dims().to_vec();
    let numel: usize = shape.iter().product();
    if !info.layout.is_contiguous() && numel > 1 {
        return Err(ExportError::Pickle {
            path: path.to_path_buf(),
            entry: format!("tensor {}", info.name),
            detail: format!(
                "expected a contiguous tensor, found strides {:?} for shape {shape:?}",
                info.layout.stride()
            ),
        });
    }
    let width = match info.dtype {
        DType::F32 => 4,
        DType::F64 => 8,
        other => {
            return Err(ExportError::Dtype {
                name: info.name.clone(),
                found: format!("{other:?}"),
            });
        }
    };
    let truncated = |detail: String| ExportError::Archive {
        path: path.to_path_buf(),
        detail,
    };
    let mut entry = zip.by_name(&info.path).map_err(|e| {
        truncated(format!(
            "storage {} of tensor {}: {e}",
            info.path, info.name
        ))
    })?;
    let offset = info.layout.start_offset() as u64;
    std::io::copy(&mut (&mut entry).take(offset), &mut std::io::sink())
        .map_err(ExportError::io(path))?;
    let mut bytes = vec![0u8; numel * width];
    entry.read_exact(&mut bytes).map_err(|e| {
        truncated(format!(
            "storage {} of tensor {} ends early ({e})",
            info.path, info.name
        ))
    })?;
    let data = match width {
        4 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
    };
    Ok(Tensor::new(shape, data))
}
