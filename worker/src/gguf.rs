//! GGUF model files: the header (metadata and tensor descriptors) comes from the
//! `tokenize` crate's reader; this module maps the tensors onto the file's data.
//!
//! The whole file is read into memory once; tensors are byte ranges into it, so
//! quantized weights are used in place without a copy per tensor.

use std::path::Path;

pub use tokenize::gguf::{GgufHeader, Value};

use crate::quant::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(transparent)]
    Header(#[from] tokenize::gguf::GgufError),
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("GGUF file is truncated or corrupt at byte {0}")]
    Truncated(usize),
    #[error("tensor {name} has unsupported ggml type {ty}")]
    TensorType { name: String, ty: u32 },
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {0}: {1}")]
    BadTensor(String, String),
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

pub struct Gguf {
    pub header: GgufHeader,
    pub tensors: Vec<TensorInfo>,
    data: Vec<u8>,
}

/// The tokenizer is built from the header (`Tokenizer::from_gguf(&gguf)`).
impl AsRef<GgufHeader> for Gguf {
    fn as_ref(&self) -> &GgufHeader {
        &self.header
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let data = std::fs::read(path)
            .map_err(|source| GgufError::Io { path: path.display().to_string(), source })?;
        Gguf::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Gguf, GgufError> {
        let header = GgufHeader::parse(&data)?;
        let mut tensors = Vec::with_capacity(header.tensors.len());
        for raw in &header.tensors {
            let name = raw.name.clone();
            let ty = GgmlType::from_u32(raw.ty).ok_or_else(|| GgufError::TensorType { name: name.clone(), ty: raw.ty })?;
            let n: usize = raw.dims.iter().product();
            let row = raw.dims.first().copied().unwrap_or(1);
            if row % ty.block_size() != 0 {
                return Err(GgufError::BadTensor(name, format!("row length {row} not a multiple of the block size")));
            }
            let n_bytes = n / ty.block_size() * ty.block_bytes();
            let offset = header.data_offset + raw.offset;
            if offset + n_bytes > data.len() {
                return Err(GgufError::Truncated(offset));
            }
            tensors.push(TensorInfo { name, dims: raw.dims.clone(), ty, offset, n_bytes });
        }
        Ok(Gguf { header, tensors, data })
    }

    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        Ok(self.header.get(key)?)
    }
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        Ok(self.header.get_u64(key)?)
    }
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        Ok(self.header.get_f64(key)?)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.header.get_str(key)
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }
    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
    }
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        // Bounds were validated in `parse`.
        &self.data[t.offset..t.offset + t.n_bytes]
    }
}
