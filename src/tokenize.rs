//! Tokenisation as `transformers` does it: `tokenizer.json` when present, else WordPiece from
//! `vocab.txt` (BERT) or byte-level BPE from `vocab.json` + `merges.txt` (RoBERTa). Truncation
//! is longest-first to a maximum length; padding is ours (to the longest in the batch), whatever
//! the file says (sentence-transformers' files pad every input to 128).

use std::path::Path;

use burn::prelude::*;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::LoadError;
use crate::model::Inputs;

/// One encoded example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub tokens: Vec<String>,
}

/// A tokenizer with the padding id and maximum length fixed.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub pad_id: u32,
    pub max_len: usize,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> LoadError {
    LoadError::Tokenizer {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// `tokenizer_config.json`'s `do_lower_case` (default true, as `BertTokenizer`).
fn lower_case(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true)
}

impl TextTokenizer {
    /// Loads the tokenizer of a model directory.
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self, LoadError> {
        let json = dir.join("tokenizer.json");
        let vocab_txt = dir.join("vocab.txt");
        let vocab_json = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?
        } else if vocab_txt.is_file() {
            let p = vocab_txt.to_string_lossy().to_string();
            let wp = WordPiece::from_file(&p)
                .unk_token("[UNK]".into())
                .build()
                .map_err(|e| tok_err(&vocab_txt, e))?;
            let id = |t: &str| {
                wp_id(&wp, t).ok_or_else(|| tok_err(&vocab_txt, format!("no `{t}` token")))
            };
            let (sep, cls) = (id("[SEP]")?, id("[CLS]")?);
            let mut tok = Tokenizer::new(wp);
            tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lower_case(dir))));
            tok.with_pre_tokenizer(Some(BertPreTokenizer));
            tok.with_post_processor(Some(BertProcessing::new(
                ("[SEP]".into(), sep),
                ("[CLS]".into(), cls),
            )));
            tok.with_decoder(Some(WordPieceDecoder::default()));
            tok
        } else if vocab_json.is_file() && merges.is_file() {
            let bpe = BPE::from_file(&vocab_json.to_string_lossy(), &merges.to_string_lossy())
                .build()
                .map_err(|e| tok_err(&vocab_json, e))?;
            let id = |t: &str| {
                bpe.get_vocab()
                    .get(t)
                    .copied()
                    .ok_or_else(|| tok_err(&vocab_json, format!("no `{t}` token")))
            };
            let (sep, cls) = (id("</s>")?, id("<s>")?);
            let mut tok = Tokenizer::new(bpe);
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            tok.with_post_processor(Some(
                RobertaProcessing::new(("</s>".into(), sep), ("<s>".into(), cls))
                    .trim_offsets(true)
                    .add_prefix_space(false),
            ));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
            tok
        } else {
            return Err(tok_err(
                dir,
                "no tokenizer.json, vocab.txt or vocab.json + merges.txt",
            ));
        };
        Self::new(inner, max_len).map_err(|e| tok_err(dir, e))
    }

    pub fn new(mut inner: Tokenizer, max_len: usize) -> Result<Self, String> {
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| e.to_string())?;
        let pad_id = ["[PAD]", "<pad>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .unwrap_or(0);
        Ok(Self {
            inner,
            pad_id,
            max_len,
        })
    }

    /// Encodes a sentence or a pair with the model's special tokens.
    pub fn encode(&self, a: &str, b: Option<&str>) -> Result<Encoded, String> {
        let enc = match b {
            Some(b) => self.inner.encode((a, b), true),
            None => self.inner.encode(a, true),
        }
        .map_err(|e| e.to_string())?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            tokens: enc.get_tokens().to_vec(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

fn wp_id(wp: &WordPiece, token: &str) -> Option<u32> {
    use tokenizers::Model;
    wp.token_to_id(token)
}

/// A right-padded batch on the host, `[batch, seq]` row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBatch {
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    pub batch: usize,
    pub seq: usize,
}

impl HostBatch {
    /// Pads to the longest example of the batch (not to the maximum length).
    pub fn collate(examples: &[&Encoded], pad_id: u32) -> Self {
        let seq = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let batch = examples.len();
        let mut b = HostBatch {
            input_ids: vec![pad_id as i64; batch * seq],
            attention_mask: vec![0; batch * seq],
            token_type_ids: vec![0; batch * seq],
            batch,
            seq,
        };
        for (r, e) in examples.iter().enumerate() {
            for (c, (&id, &tt)) in e.ids.iter().zip(&e.type_ids).enumerate() {
                b.input_ids[r * seq + c] = id as i64;
                b.attention_mask[r * seq + c] = 1;
                b.token_type_ids[r * seq + c] = tt as i64;
            }
        }
        b
    }

    /// Right-pads to `seq` positions (mask 0, the pad id, token type 0); a batch already that
    /// long or longer is returned as it is.
    pub fn pad_to(&self, seq: usize, pad_id: u32) -> HostBatch {
        if seq <= self.seq {
            return self.clone();
        }
        let mut out = HostBatch {
            input_ids: vec![pad_id as i64; self.batch * seq],
            attention_mask: vec![0; self.batch * seq],
            token_type_ids: vec![0; self.batch * seq],
            batch: self.batch,
            seq,
        };
        for r in 0..self.batch {
            let (from, to) = (
                r * self.seq..(r + 1) * self.seq,
                r * seq..r * seq + self.seq,
            );
            out.input_ids[to.clone()].copy_from_slice(&self.input_ids[from.clone()]);
            out.attention_mask[to.clone()].copy_from_slice(&self.attention_mask[from.clone()]);
            out.token_type_ids[to].copy_from_slice(&self.token_type_ids[from]);
        }
        out
    }

    pub fn to_inputs(&self, device: &Device) -> Inputs {
        let t = |v: &Vec<i64>| {
            Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [self.batch, self.seq]), device)
        };
        Inputs {
            input_ids: t(&self.input_ids),
            attention_mask: t(&self.attention_mask),
            token_type_ids: Some(t(&self.token_type_ids)),
        }
    }
}
