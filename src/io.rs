//! File output that never leaves a half-written file behind, and the safetensors dumps used by
//! `inspect` and the parity checks.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors, View};

/// An exclusive lock on a directory, held while the value lives: two processes writing one run
/// directory would interleave their checkpoints, best models and logs.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Locks `dir` (through its `.lock` file) or says which process-level conflict stops it.
pub fn lock_dir(dir: &Path) -> Result<DirLock> {
    let path = dir.join(".lock");
    let file = std::fs::File::options()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{} is in use by another process (a run still going?): wait for it to end or stop it",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// A host tensor to dump: f32 or i64, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

impl HostTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32 { shape, .. } | HostTensor::I64 { shape, .. } => shape,
        }
    }

    pub fn from_float<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t.into_data().try_into_vec_as::<f32>().expect("float data");
        HostTensor::F32 { shape, data }
    }

    pub fn from_int<const D: usize>(t: Tensor<D, Int>) -> Self {
        let shape = t.dims().to_vec();
        let data = t.into_data().try_into_vec_as::<i64>().expect("int data");
        HostTensor::I64 { shape, data }
    }

    /// Values as f64 (ints converted), for comparisons.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            HostTensor::F32 { data, .. } => data.iter().map(|&x| x as f64).collect(),
            HostTensor::I64 { data, .. } => data.iter().map(|&x| x as f64).collect(),
        }
    }

    pub fn to_i64(&self) -> Result<Vec<i64>> {
        match self {
            HostTensor::I64 { data, .. } => Ok(data.clone()),
            HostTensor::F32 { .. } => bail!("expected an integer tensor, found f32"),
        }
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        match self {
            HostTensor::F32 { .. } => Dtype::F32,
            HostTensor::I64 { .. } => Dtype::I64,
        }
    }
    fn shape(&self) -> &[usize] {
        HostTensor::shape(self)
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            HostTensor::F32 { data, .. } => {
                Cow::Owned(data.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            HostTensor::I64 { data, .. } => {
                Cow::Owned(data.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        }
    }
    fn data_len(&self) -> usize {
        match self {
            HostTensor::F32 { data, .. } => data.len() * 4,
            HostTensor::I64 { data, .. } => data.len() * 8,
        }
    }
}

/// Writes tensors to a safetensors file, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata)
        .with_context(|| format!("serialising {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file (float types as f32, integer types as i64).
pub fn load_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, v) in st.tensors() {
        let shape = v.shape().to_vec();
        let b = v.data();
        let t = match v.dtype() {
            Dtype::F32 => HostTensor::F32 {
                shape,
                data: b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            },
            Dtype::F64 => HostTensor::F32 {
                shape,
                data: b
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
            },
            // Exports may store f16 or bf16 weights (`export --dtype f16`); both widen exactly.
            Dtype::F16 => HostTensor::F32 {
                shape,
                data: b
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            },
            Dtype::BF16 => HostTensor::F32 {
                shape,
                data: b
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            },
            Dtype::I64 => HostTensor::I64 {
                shape,
                data: b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            },
            Dtype::I32 => HostTensor::I64 {
                shape,
                data: b
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            },
            other => bail!(
                "{}: tensor `{name}` has unsupported dtype {other:?}",
                path.display()
            ),
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Reads a saved batch (`input_ids`, `attention_mask`, optional `token_type_ids`, as in the
/// fixtures) into model inputs.
pub fn batch_from_safetensors(path: &Path, device: &Device) -> Result<crate::model::Inputs> {
    let map = load_safetensors(path)?;
    let get = |k: &str| -> Result<Option<Tensor<2, Int>>> {
        let Some(t) = map.get(k) else { return Ok(None) };
        let shape = t.shape().to_vec();
        if shape.len() != 2 {
            bail!(
                "{}: `{k}` must be [batch, seq], found {shape:?}",
                path.display()
            );
        }
        let data = t
            .to_i64()
            .with_context(|| format!("{}: `{k}`", path.display()))?;
        Ok(Some(Tensor::from_data(
            TensorData::new(data, shape),
            device,
        )))
    };
    let input_ids =
        get("input_ids")?.with_context(|| format!("{}: no `input_ids` tensor", path.display()))?;
    let attention_mask = match get("attention_mask")? {
        Some(m) => m,
        None => input_ids.ones_like(),
    };
    Ok(crate::model::Inputs {
        input_ids,
        attention_mask,
        token_type_ids: get("token_type_ids")?,
    })
}

#[cfg(test)]
mod lock_tests {
    use super::lock_dir;

    #[test]
    fn a_locked_directory_refuses_a_second_holder_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_dir(dir.path()).unwrap();
        let err = lock_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another process"), "{err}");
        drop(first);
        lock_dir(dir.path()).unwrap();
    }
}

#[cfg(test)]
mod half_tests {
    use super::*;

    /// f16 and bf16 tensors (an `export --dtype f16`) read back as the values they encode.
    #[test]
    fn half_precision_tensors_widen_exactly() {
        let vals = [0.5f32, -2.0, 1e-3, 65504.0, -0.1];
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let views = [
            (
                "a",
                safetensors::tensor::TensorView::new(Dtype::F16, vec![5], &f16).unwrap(),
            ),
            (
                "b",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![5], &bf16).unwrap(),
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        let map = load_safetensors(&path).unwrap();
        let got = |k: &str| map[k].to_f64();
        for (i, v) in vals.iter().enumerate() {
            assert_eq!(got("a")[i], half::f16::from_f32(*v).to_f32() as f64);
            assert_eq!(got("b")[i], half::bf16::from_f32(*v).to_f32() as f64);
        }
        assert_eq!(got("a")[3], 65504.0);
    }
}
