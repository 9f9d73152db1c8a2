//! GGUF v2/v3 header reader: metadata key/values and tensor descriptors, without the
//! tensor data. The worker maps the tensor descriptors onto the file's data (its
//! `gguf` module); reading a model only for its tokenizer reads just this header.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a GGUF file (bad magic)")]
    BadMagic,
    #[error("unsupported GGUF version {0}")]
    Version(u32),
    #[error("GGUF file is truncated or corrupt at byte {0}")]
    Truncated(usize),
    #[error("cannot read the GGUF header at byte {at}: {source}")]
    Read { at: usize, source: std::io::Error },
    #[error("unknown GGUF metadata value type {0}")]
    ValueType(u32),
    #[error("missing metadata key {0}")]
    MissingKey(String),
}

/// A metadata value.
#[derive(Debug, Clone)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v.into()),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor descriptor as the header states it. The ggml type stays a raw id: what
/// each type's blocks look like is the worker's business (its `quant` module).
#[derive(Debug, Clone)]
pub struct RawTensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<usize>,
    /// The ggml type id (0 = F32, 1 = F16, 2 = Q4_0, …).
    pub ty: u32,
    /// Byte offset of the data from the start of the data section (`data_offset`).
    pub offset: usize,
}

/// Everything in a GGUF file before the tensor data.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<RawTensorInfo>,
    /// Absolute byte offset of the (aligned) data section.
    pub data_offset: usize,
}

impl AsRef<GgufHeader> for GgufHeader {
    fn as_ref(&self) -> &GgufHeader {
        self
    }
}

/// Reads the header from any byte source, counting the position for error messages
/// and bounding lengths by the size of the whole file.
struct Reader<R> {
    inner: R,
    pos: usize,
    file_len: usize,
}

impl<R: Read> Reader<R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        let at = self.pos;
        self.inner.read_exact(buf).map_err(|source| match source.kind() {
            std::io::ErrorKind::UnexpectedEof => GgufError::Truncated(at),
            _ => GgufError::Read { at, source },
        })?;
        self.pos += buf.len();
        Ok(())
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        self.fill(&mut a)?;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self) -> Result<usize, GgufError> {
        let pos = self.pos;
        let n = self.u64()?;
        // A length can never exceed the file itself; this also guards allocations.
        usize::try_from(n).ok().filter(|&n| n <= self.file_len).ok_or(GgufError::Truncated(pos))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.len()?;
        let mut bytes = vec![0u8; n];
        self.fill(&mut bytes)?;
        Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }
    fn value(&mut self, ty: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.arr()?)),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => return Err(GgufError::ValueType(other)),
        })
    }
}

impl GgufHeader {
    /// Reads only the header of the file at `path`; the tensor data is never read.
    pub fn read_file(path: &Path) -> Result<GgufHeader, GgufError> {
        let io = |source| GgufError::Io { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let file_len = usize::try_from(file_len).unwrap_or(usize::MAX);
        // The metadata is a long run of small reads (one per token string).
        GgufHeader::read(BufReader::with_capacity(1 << 16, file), file_len)
    }

    /// Parses the header at the start of a whole file held in memory.
    pub fn parse(data: &[u8]) -> Result<GgufHeader, GgufError> {
        GgufHeader::read(data, data.len())
    }

    /// Reads the header from `source`, which holds a file of `file_len` bytes.
    pub fn read(source: impl Read, file_len: usize) -> Result<GgufHeader, GgufError> {
        let mut r = Reader { inner: source, pos: 0, file_len };
        if &r.arr::<4>()? != b"GGUF" {
            return Err(GgufError::BadMagic);
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            let mut dims = Vec::with_capacity(nd.min(8));
            for _ in 0..nd {
                dims.push(r.len()?);
            }
            let ty = r.u32()?;
            let offset = r.len()?;
            tensors.push(RawTensorInfo { name, dims, ty, offset });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .map_or(32, |a| a as usize)
            .max(1);
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        Ok(GgufHeader { version, metadata, tensors, data_offset })
    }

    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)?.as_u64().ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)?.as_f64().ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }
}
