//! A model's byte-level BPE tokenizer, built from its GGUF metadata or its Hugging Face
//! `tokenizer.json`, and the GGUF header reader that needs; and WordPiece (`wordpiece`),
//! the tokenizer of BERT-family embedding models. The worker runs models with
//! it; the gateway counts delivered tokens with it. It depends on no tensor library, so
//! the gateway stays free of the worker's inference stack.

pub mod embeddings;
pub mod gguf;
pub mod hf;
pub mod tokenizer;
pub mod wordpiece;

use std::io::Read;
use std::path::Path;

pub use crate::tokenizer::{Tokenizer, TokenizerError, Utf8Stream};

/// Loads the tokenizer of a model from `path`: a `.gguf` file (only its header is
/// read), a Hugging Face model directory (its `tokenizer.json`), or a `tokenizer.json`.
/// GGUF files are recognised by their magic bytes, not their name.
pub fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
    if path.is_dir() {
        return hf::load(&path.join("tokenizer.json"));
    }
    let io = |source| TokenizerError::Io { path: path.display().to_string(), source };
    let mut magic = Vec::with_capacity(4);
    std::fs::File::open(path).and_then(|f| f.take(4).read_to_end(&mut magic)).map_err(io)?;
    if magic == b"GGUF" {
        return Tokenizer::from_gguf(&gguf::GgufHeader::read_file(path)?);
    }
    hf::load(path)
}

#[cfg(test)]
mod fixture;

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::fixture::{id, write, EOS};
    use crate::gguf::{GgufError, GgufHeader};

    /// Counts the bytes a reader hands out.
    struct Counting<'a> {
        inner: &'a [u8],
        read: usize,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n;
            Ok(n)
        }
    }

    fn check_encodings(tok: &Tokenizer) {
        // Merges apply in rank order: h e → he, l l → ll, he ll → hell, hell o → hello.
        assert_eq!(tok.encode_text("hello"), [id("hello")]);
        assert_eq!(tok.encode_text("hello world").len(), 6, "hello, Ġw, o, r, l, d");
        assert_eq!(tok.encode_text(&format!("hello{EOS}")), [id("hello"), id(EOS)], "special tokens are atomic");
        for text in ["hello world", "Café 😀 2024\n\ttabs", ""] {
            assert_eq!(tok.decode(&tok.encode_text(text)), text);
        }
        assert_eq!(tok.eos, id(EOS));
    }

    #[test]
    fn gguf_header_is_read_without_the_tensor_data() {
        let bytes = fixture::gguf_bytes(1 << 20);
        let header = GgufHeader::parse(&bytes).unwrap();
        assert_eq!(header.version, 3);
        assert_eq!(header.get_str("tokenizer.ggml.model"), Some("gpt2"));
        assert_eq!(header.tensors.len(), 1);
        assert_eq!((header.tensors[0].name.as_str(), header.tensors[0].ty), ("blk.0.attn_q.weight", 2));
        assert_eq!(header.data_offset % 32, 0);
        assert_eq!(bytes.len() - header.data_offset, 1 << 20);
        // Reading stops where the header ends: none of the megabyte of data is read.
        let mut source = Counting { inner: &bytes, read: 0 };
        GgufHeader::read(&mut source, bytes.len()).unwrap();
        assert!(source.read <= header.data_offset, "read {} bytes of a {}-byte header", source.read, header.data_offset);
    }

    #[test]
    fn gguf_errors_say_what_is_wrong() {
        let bytes = fixture::gguf_bytes(0);
        assert!(matches!(GgufHeader::parse(&bytes[..100]), Err(GgufError::Truncated(_))));
        assert!(matches!(GgufHeader::parse(b"GGML\x03\0\0\0"), Err(GgufError::BadMagic)));
        let mut v1 = bytes.clone();
        v1[4] = 1;
        assert!(matches!(GgufHeader::parse(&v1), Err(GgufError::Version(1))));
        assert!(matches!(GgufHeader::parse(&bytes).unwrap().get_u64("nope"), Err(GgufError::MissingKey(k)) if k == "nope"));
    }

    #[test]
    fn loads_from_a_gguf_file_by_its_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        write(&path, &fixture::gguf_bytes(4096));
        check_encodings(&load(&path).unwrap());
        let truncated = dir.path().join("cut.gguf");
        write(&truncated, &fixture::gguf_bytes(0)[..64]);
        let err = load(&truncated).err().unwrap();
        assert!(matches!(err, TokenizerError::Gguf(GgufError::Truncated(_))), "{err}");
    }

    #[test]
    fn loads_from_tokenizer_json_and_model_directories() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("tokenizer.json");
        write(&json, fixture::tokenizer_json().to_string().as_bytes());
        // On its own, tokenizer.json names no end token: the usual name serves.
        let alone = load(&json).unwrap();
        check_encodings(&alone);
        assert_eq!(alone.bos, None);
        // tokenizer_config.json next to it names BOS, EOS and asks for BOS on prompts.
        let config = serde_json::json!({"bos_token": "hello", "eos_token": {"content": EOS}, "add_bos_token": true});
        write(&dir.path().join("tokenizer_config.json"), config.to_string().as_bytes());
        let from_dir = load(dir.path()).unwrap();
        check_encodings(&from_dir);
        assert_eq!(from_dir.encode("hello"), [id("hello"), id("hello")], "BOS, then the text");
        assert_eq!(from_dir.encode_text("hello"), [id("hello")], "encode_text adds no BOS");
        // The same vocabulary gives the same ids from either format.
        let gguf = dir.path().join("m.gguf");
        write(&gguf, &fixture::gguf_bytes(0));
        let text = "hello world, hello!";
        assert_eq!(load(&gguf).unwrap().encode_text(text), from_dir.encode_text(text));
    }

    #[test]
    fn bad_sources_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere.gguf");
        let err = load(&missing).err().unwrap().to_string();
        assert!(err.contains("nowhere.gguf"), "{err}");
        let not_json = dir.path().join("tokenizer.json");
        write(&not_json, b"{ not json");
        let err = load(&not_json).err().unwrap().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("not valid JSON"), "{err}");
        let err = load(dir.path().join("empty-dir").as_path()).err().unwrap().to_string();
        assert!(err.contains("empty-dir"), "{err}");
        std::fs::create_dir(dir.path().join("no-tokenizer")).unwrap();
        let err = load(&dir.path().join("no-tokenizer")).err().unwrap().to_string();
        assert!(err.contains("no-tokenizer/tokenizer.json"), "{err}");
    }
}
