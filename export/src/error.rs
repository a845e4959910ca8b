//! Export errors. Each says what was expected and what was found, because the person reading
//! it usually holds a checkpoint from someone else and needs to know what is wrong with it.

use std::path::PathBuf;

use csg_bundle::BundleError;

fn shape(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" … ({} more)", names.len() - SHOWN));
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: expected {expected}, found {found}", path.display())]
    UnknownFormat {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
    #[error(
        "{}: expected a complete zip archive (torch.save format), found a truncated or damaged one: {detail}",
        path.display()
    )]
    Archive { path: PathBuf, detail: String },
    #[error("{}: cannot read the pickle {entry} inside the archive: {detail}", path.display())]
    Pickle {
        path: PathBuf,
        entry: String,
        detail: String,
    },
    #[error(
        "{}: expected a state dict (name → tensor, or a dict holding one under \"model_state_dict\"), found {found}",
        path.display()
    )]
    NotStateDict { path: PathBuf, found: String },
    #[error("{}: {detail}", path.display())]
    Safetensors { path: PathBuf, detail: String },
    #[error("tensor {name}: expected dtype float32, found {found}")]
    Dtype { name: String, found: String },
    #[error("missing tensors expected by {arch}: {}", list(.names))]
    MissingKeys { arch: String, names: Vec<String> },
    #[error("tensor {name} is misshapen: expected shape {}, found {}", shape(.expected), shape(.found))]
    Misshapen {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("unexpected tensors that {arch} does not use (a different architecture?): {}", list(.names))]
    UnexpectedKeys { arch: String, names: Vec<String> },
    #[error("cannot infer the architecture: expected {expected}, found {found}")]
    Architecture { expected: String, found: String },
    #[error("invalid option: {0}")]
    Options(String),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

impl ExportError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
