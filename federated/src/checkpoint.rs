//! Model and update files: safetensors with the architecture in the metadata.
//!
//! A file holds one `F32` tensor per entry of [`Architecture::tensors`] and the
//! metadata keys `format` (`agentmesh-model`), `version` (`1`), `content`
//! (`model` or `update`) and `architecture` (the JSON of [`Architecture`]).
//! Loading checks the size limit, the header, the architecture, every tensor's
//! name, dtype and shape, and that every value is finite.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::model::{Architecture, Model, ModelError};

/// Largest model or update file accepted, in bytes (`MAX_PARAMS` `f32`s plus
/// room for the header).
pub const MAX_MODEL_FILE_SIZE: usize = crate::model::MAX_PARAMS * 4 + (1 << 20);

const FORMAT: &str = "agentmesh-model";
const VERSION: &str = "1";

/// What a parameter file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Model parameters.
    Model,
    /// A change to add to a model's parameters.
    Update,
}

impl Content {
    fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Update => "update",
        }
    }
}

/// Why a model or update file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is larger than the limit.
    #[error("file is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// Not a valid safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// A metadata key is missing or wrong.
    #[error("metadata {key:?}: {problem}")]
    Metadata {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The architecture in the metadata is not usable.
    #[error("architecture: {0}")]
    Architecture(#[from] ModelError),
    /// The file's tensors do not match its architecture.
    #[error("tensor {name:?}: {problem}")]
    Tensor {
        /// The tensor name.
        name: String,
        /// What does not match.
        problem: String,
    },
    /// A value is NaN or infinite.
    #[error("tensor {name:?} element {index} is not finite")]
    NotFinite {
        /// The tensor name.
        name: String,
        /// Index within the tensor.
        index: usize,
    },
    /// An update file was given where a model was expected, or the reverse.
    #[error("expected a {expected} file, found a {found} file")]
    WrongContent {
        /// What the caller wanted.
        expected: &'static str,
        /// What the file says.
        found: String,
    },
    /// The file's architecture is not the one the caller requires.
    #[error("architecture mismatch: expected {expected}, file has {found}")]
    ArchitectureMismatch {
        /// What the caller wanted (JSON).
        expected: String,
        /// What the file holds (JSON).
        found: String,
    },
}

/// Encodes flat parameters as safetensors bytes.
pub fn encode(
    architecture: &Architecture,
    params: &[f32],
    content: Content,
) -> Result<Vec<u8>, CheckpointError> {
    architecture.validate()?;
    if params.len() != architecture.num_params() {
        return Err(ModelError::WrongLength {
            expected: architecture.num_params(),
            found: params.len(),
        }
        .into());
    }
    let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
    let specs = architecture.tensors();
    let mut views = Vec::with_capacity(specs.len());
    for spec in &specs {
        let data = &bytes[spec.offset * 4..(spec.offset + spec.len()) * 4];
        views.push((
            spec.name.clone(),
            TensorView::new(Dtype::F32, spec.shape.clone(), data)?,
        ));
    }
    let arch_json = serde_json::to_string(architecture).map_err(|e| CheckpointError::Metadata {
        key: "architecture",
        problem: e.to_string(),
    })?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        ("content".to_string(), content.as_str().to_string()),
        ("architecture".to_string(), arch_json),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata))?;
    Ok(canonical_header(bytes))
}

/// Rewrites the safetensors JSON header with its keys sorted. `safetensors` writes the
/// metadata map in hash order, which differs between processes; models are identified by the
/// hash of their bytes, so the same parameters must always give the same bytes. The header
/// keeps its length (same entries, same padding), so the data offsets stay valid.
fn canonical_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(len) = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| u64::from_le_bytes(b) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + len) else {
        return bytes;
    };
    let trimmed = std::str::from_utf8(header).map(str::trim_end);
    let Ok(Ok(value)) = trimmed.map(serde_json::from_str::<serde_json::Value>) else {
        return bytes;
    };
    // serde_json's map is ordered by key (no `preserve_order`), at every depth.
    let Ok(mut sorted) = serde_json::to_vec(&value) else {
        return bytes;
    };
    if sorted.len() > len {
        return bytes;
    }
    sorted.resize(len, b' ');
    bytes[8..8 + len].copy_from_slice(&sorted);
    bytes
}

/// Decodes safetensors bytes into an architecture, flat parameters and what
/// they are, validating everything (see the module docs).
pub fn decode(bytes: &[u8]) -> Result<(Architecture, Vec<f32>, Content), CheckpointError> {
    if bytes.len() > MAX_MODEL_FILE_SIZE {
        return Err(CheckpointError::TooLarge {
            size: bytes.len() as u64,
            limit: MAX_MODEL_FILE_SIZE,
        });
    }
    let tensors = SafeTensors::deserialize(bytes)?;
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let empty = HashMap::new();
    let meta = header.metadata().as_ref().unwrap_or(&empty);
    let get = |key: &'static str| {
        meta.get(key).ok_or(CheckpointError::Metadata {
            key,
            problem: "missing".to_string(),
        })
    };
    let format = get("format")?;
    if format != FORMAT {
        return Err(CheckpointError::Metadata {
            key: "format",
            problem: format!("{format:?} is not {FORMAT:?}"),
        });
    }
    let version = get("version")?;
    if version != VERSION {
        return Err(CheckpointError::Metadata {
            key: "version",
            problem: format!("unsupported version {version:?}"),
        });
    }
    let content = match get("content")?.as_str() {
        "model" => Content::Model,
        "update" => Content::Update,
        other => {
            return Err(CheckpointError::Metadata {
                key: "content",
                problem: format!("{other:?} is neither \"model\" nor \"update\""),
            })
        }
    };
    let architecture: Architecture =
        serde_json::from_str(get("architecture")?).map_err(|e| CheckpointError::Metadata {
            key: "architecture",
            problem: e.to_string(),
        })?;
    architecture.validate()?;
    let specs = architecture.tensors();
    if tensors.len() != specs.len() {
        let mut names = tensors.names();
        names.sort_unstable();
        return Err(CheckpointError::Tensor {
            name: names.join(","),
            problem: format!(
                "file has {} tensors, the architecture has {}",
                tensors.len(),
                specs.len()
            ),
        });
    }
    // Every tensor is checked against the architecture before anything is
    // allocated, so a small file claiming a huge architecture costs nothing.
    let mut views = Vec::with_capacity(specs.len());
    for spec in &specs {
        let view = tensors
            .tensor(&spec.name)
            .map_err(|_| CheckpointError::Tensor {
                name: spec.name.clone(),
                problem: "missing".to_string(),
            })?;
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Tensor {
                name: spec.name.clone(),
                problem: format!("dtype {:?}, expected F32", view.dtype()),
            });
        }
        if view.shape() != spec.shape.as_slice() {
            return Err(CheckpointError::Tensor {
                name: spec.name.clone(),
                problem: format!("shape {:?}, expected {:?}", view.shape(), spec.shape),
            });
        }
        views.push((spec, view));
    }
    let mut params = Vec::with_capacity(architecture.num_params());
    for (spec, view) in views {
        for (index, chunk) in view.data().chunks_exact(4).enumerate() {
            let v = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            if !v.is_finite() {
                return Err(CheckpointError::NotFinite {
                    name: spec.name.clone(),
                    index,
                });
            }
            params.push(v);
        }
    }
    Ok((architecture, params, content))
}

/// Reads a file, refusing one above [`MAX_MODEL_FILE_SIZE`] before reading it.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_MODEL_FILE_SIZE as u64 {
        return Err(CheckpointError::TooLarge {
            size,
            limit: MAX_MODEL_FILE_SIZE,
        });
    }
    std::fs::read(path).map_err(io)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    std::fs::write(path, bytes).map_err(|source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl Model {
    /// The model as safetensors bytes.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, CheckpointError> {
        encode(self.architecture(), self.params(), Content::Model)
    }

    /// A model from safetensors bytes (validated; update files are refused).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, CheckpointError> {
        let (architecture, params, content) = decode(bytes)?;
        if content != Content::Model {
            return Err(CheckpointError::WrongContent {
                expected: "model",
                found: content.as_str().to_string(),
            });
        }
        Ok(Self::from_params(architecture, params)?)
    }

    /// Writes the model to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        write_file(path, &self.to_safetensors()?)
    }

    /// Reads a model from a safetensors file.
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        Self::from_safetensors(&read_file(path)?)
    }
}

/// Writes an update (a parameter delta for `architecture`) to a file.
pub fn save_update(
    path: &Path,
    architecture: &Architecture,
    delta: &[f32],
) -> Result<(), CheckpointError> {
    write_file(path, &encode(architecture, delta, Content::Update)?)
}

/// Reads an update file and checks it is for `architecture`.
pub fn load_update(path: &Path, architecture: &Architecture) -> Result<Vec<f32>, CheckpointError> {
    let (found, delta, content) = decode(&read_file(path)?)?;
    if content != Content::Update {
        return Err(CheckpointError::WrongContent {
            expected: "update",
            found: content.as_str().to_string(),
        });
    }
    if &found != architecture {
        return Err(CheckpointError::ArchitectureMismatch {
            expected: serde_json::to_string(architecture).unwrap_or_default(),
            found: serde_json::to_string(&found).unwrap_or_default(),
        });
    }
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let arch = Architecture::Mlp {
            inputs: 6,
            hidden: vec![5, 4],
            classes: 3,
        };
        Model::new(arch, 9).unwrap()
    }

    #[test]
    fn round_trip() -> anyhow::Result<()> {
        let m = model();
        let bytes = m.to_safetensors()?;
        assert_eq!(Model::from_safetensors(&bytes)?, m);
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m.safetensors");
        m.save(&path)?;
        assert_eq!(Model::load(&path)?, m);
        save_update(&path, m.architecture(), m.params())?;
        assert_eq!(load_update(&path, m.architecture())?, m.params());
        assert!(matches!(
            Model::load(&path),
            Err(CheckpointError::WrongContent { .. })
        ));
        Ok(())
    }

    #[test]
    fn the_same_parameters_always_give_the_same_bytes() -> anyhow::Result<()> {
        // Each HashMap hashes with its own random keys, so without sorting the metadata
        // order would change from one encoding to the next.
        let m = model();
        let first = m.to_safetensors()?;
        for _ in 0..32 {
            assert_eq!(m.to_safetensors()?, first);
        }
        let len = u64::from_le_bytes(first[..8].try_into()?) as usize;
        let header = std::str::from_utf8(&first[8..8 + len])?;
        let at = |k: &str| header.find(k).unwrap();
        assert!(at("\"architecture\"") < at("\"content\"") && at("\"content\"") < at("\"format\""));
        assert_eq!(Model::from_safetensors(&first)?, m);
        Ok(())
    }

    #[test]
    fn rejects_bad_files() -> anyhow::Result<()> {
        let m = model();
        assert!(matches!(
            Model::from_safetensors(b"garbage"),
            Err(CheckpointError::Safetensors(_))
        ));
        // A NaN parameter.
        let mut bad = m.params().to_vec();
        bad[3] = f32::NAN;
        let bytes = encode(m.architecture(), &bad, Content::Model)?;
        let err = Model::from_safetensors(&bytes).unwrap_err();
        assert!(
            matches!(err, CheckpointError::NotFinite { index: 3, .. }),
            "{err}"
        );
        // The metadata claims a different architecture than the tensors hold.
        let other = Architecture::Mlp {
            inputs: 6,
            hidden: vec![5, 5],
            classes: 3,
        };
        let mut forged = m.to_safetensors()?;
        let real = br#"\"hidden\":[5,4]"#;
        let at = forged
            .windows(real.len())
            .position(|w| w == real)
            .ok_or_else(|| anyhow::anyhow!("architecture not found in header"))?;
        forged[at..at + real.len()].copy_from_slice(br#"\"hidden\":[5,5]"#);
        let err = Model::from_safetensors(&forged).unwrap_err();
        assert!(matches!(err, CheckpointError::Tensor { .. }), "{err}");
        // Not ours.
        let plain = safetensors::serialize(
            [("x", TensorView::new(Dtype::F32, vec![1], &[0u8; 4])?)],
            None,
        )?;
        assert!(matches!(
            Model::from_safetensors(&plain),
            Err(CheckpointError::Metadata { key: "format", .. })
        ));
        let other_model = Model::new(other.clone(), 0)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("u.safetensors");
        save_update(&path, &other, other_model.params())?;
        assert!(matches!(
            load_update(&path, m.architecture()),
            Err(CheckpointError::ArchitectureMismatch { .. })
        ));
        Ok(())
    }
}
