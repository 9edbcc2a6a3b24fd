//! Tokenise a dataset once, then cut it into batches: padded to the longest example of each
//! batch (rounded up to a multiple, see [`Tokenized::pad_to_multiple_of`]), optionally bucketed
//! by length, shuffled deterministically from a seed; for evaluation the last partial batch is
//! kept.

use indicatif::{ProgressBar, ProgressStyle};

use super::{Dataset, Label};
use crate::tokenize::{Encoded, HostBatch, TextTokenizer};

/// A dataset's examples, tokenised (pairs truncated longest-first to the tokenizer's maximum
/// length, as Hugging Face does), with their labels.
#[derive(Clone, Debug)]
pub struct Tokenized {
    pub encoded: Vec<Encoded>,
    pub labels: Vec<Option<Label>>,
    pub pad_id: u32,
    /// Examples that were cut to the maximum length.
    pub truncated: usize,
    /// Batches are padded to a multiple of this (1: to their longest example).
    pub pad_multiple: usize,
}

/// One batch: which examples (indices into the dataset), their padded inputs and labels.
#[derive(Clone, Debug)]
pub struct Batch {
    pub indices: Vec<usize>,
    pub inputs: HostBatch,
    /// `None` when any example of the batch is unlabelled.
    pub labels: Option<Vec<Label>>,
}

impl Batch {
    /// Class ids for a cross-entropy target; `None` if unlabelled or a regression batch.
    pub fn class_ids(&self) -> Option<Vec<i64>> {
        self.labels
            .as_ref()?
            .iter()
            .map(|l| l.class().map(|c| c as i64))
            .collect()
    }

    /// Scores for a regression target; `None` if unlabelled or a classification batch.
    pub fn scores(&self) -> Option<Vec<f32>> {
        self.labels
            .as_ref()?
            .iter()
            .map(|l| l.score().map(|s| s as f32))
            .collect()
    }
}

/// How examples are grouped into batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Dataset order.
    Sequential,
    /// Longest first: least padding, for evaluation. Ties keep dataset order.
    ByLength,
    /// A permutation drawn from `seed`. With `bucket > 1`, each run of `bucket` batches' worth
    /// of shuffled examples is sorted by length before being cut (less padding), and the
    /// batches are then shuffled again.
    Shuffle { seed: u64, bucket: usize },
}

const PARALLEL_CHUNK: usize = 256;

impl Tokenized {
    /// Tokenises every example once (`Encoded::tokens` is left empty to save memory). Shows a
    /// progress bar for large datasets.
    pub fn new(data: &Dataset, tok: &TextTokenizer) -> Result<Self, String> {
        let n = data.examples.len();
        let bar = if n >= 5000 {
            let b = ProgressBar::new(n as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "tokenising {msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("valid template"),
            );
            b.set_message(format!("{} {}", data.task.title, data.split));
            b
        } else {
            ProgressBar::hidden()
        };
        let mut encoded = Vec::with_capacity(n);
        let mut truncated = 0;
        for chunk in data.examples.chunks(PARALLEL_CHUNK) {
            let inputs: Vec<tokenizers::EncodeInput> = chunk
                .iter()
                .map(|e| match &e.text_b {
                    Some(b) => (e.text_a.as_str(), b.as_str()).into(),
                    None => e.text_a.as_str().into(),
                })
                .collect();
            let out = tok
                .inner()
                .encode_batch(inputs, true)
                .map_err(|e| e.to_string())?;
            for enc in out {
                truncated += usize::from(!enc.get_overflowing().is_empty());
                encoded.push(Encoded {
                    ids: enc.get_ids().to_vec(),
                    type_ids: enc.get_type_ids().to_vec(),
                    tokens: Vec::new(),
                });
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(Tokenized {
            encoded,
            labels: data.examples.iter().map(|e| e.label).collect(),
            pad_id: tok.pad_id,
            truncated,
            pad_multiple: 1,
        })
    }

    pub fn len(&self) -> usize {
        self.encoded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.encoded.is_empty()
    }

    /// Token counts, in dataset order.
    pub fn lengths(&self) -> Vec<usize> {
        self.encoded.iter().map(|e| e.ids.len()).collect()
    }

    /// Batches of `batch_size` in the given order; `drop_last` drops a final partial batch
    /// (training), otherwise it is kept (evaluation).
    pub fn plan(&self, batch_size: usize, order: Order, drop_last: bool) -> Vec<Vec<usize>> {
        plan_batches(&self.lengths(), batch_size, order, drop_last)
    }

    /// Pads every batch to a multiple of `multiple` positions, as `transformers`'
    /// `DataCollatorWithPadding(pad_to_multiple_of=…)` does. Backends that compile kernels for
    /// each shape (wgpu, CUDA) then see a few shapes instead of one per batch length.
    pub fn pad_to_multiple_of(mut self, multiple: usize) -> Self {
        self.pad_multiple = multiple.max(1);
        self
    }

    /// Pads the examples at `indices` to the longest of them, rounded up to the padding multiple.
    pub fn batch(&self, indices: &[usize]) -> Batch {
        let refs: Vec<&Encoded> = indices.iter().map(|&i| &self.encoded[i]).collect();
        let inputs = HostBatch::collate(&refs, self.pad_id);
        let seq = inputs.seq.div_ceil(self.pad_multiple) * self.pad_multiple;
        Batch {
            indices: indices.to_vec(),
            inputs: inputs.pad_to(seq, self.pad_id),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// Groups example indices into batches (see [`Order`]). Every index appears once, except those
/// of a dropped last partial batch.
pub fn plan_batches(
    lengths: &[usize],
    batch_size: usize,
    order: Order,
    drop_last: bool,
) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch size must be positive");
    let n = lengths.len();
    let mut idx: Vec<usize> = (0..n).collect();
    let mut batches: Vec<Vec<usize>> = match order {
        Order::Sequential => cut(&idx, batch_size),
        Order::ByLength => {
            idx.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            cut(&idx, batch_size)
        }
        Order::Shuffle { seed, bucket } => {
            let mut rng = SplitMix64::new(seed);
            rng.shuffle(&mut idx);
            if bucket > 1 {
                let span = batch_size * bucket;
                let mut batches = Vec::new();
                for chunk in idx.chunks_mut(span) {
                    chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
                    batches.extend(cut(chunk, batch_size));
                }
                // Keep a partial batch last so that `drop_last` drops only it.
                let partial = batches
                    .iter()
                    .position(|b| b.len() < batch_size)
                    .map(|p| batches.remove(p));
                rng.shuffle(&mut batches);
                batches.extend(partial);
                batches
            } else {
                cut(&idx, batch_size)
            }
        }
    };
    if drop_last && batches.last().is_some_and(|b| b.len() < batch_size) {
        batches.pop();
    }
    batches
}

fn cut(idx: &[usize], size: usize) -> Vec<Vec<usize>> {
    idx.chunks(size).map(<[usize]>::to_vec).collect()
}

/// A small deterministic generator (SplitMix64): the same permutation for the same seed on
/// every platform and version.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return (v % n) as usize;
            }
        }
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenized(lengths: &[usize]) -> Tokenized {
        let encoded = lengths
            .iter()
            .map(|&n| Encoded {
                ids: (1..=n as u32).collect(),
                type_ids: vec![0; n],
                tokens: Vec::new(),
            })
            .collect();
        Tokenized {
            encoded,
            labels: vec![None; lengths.len()],
            pad_id: 0,
            truncated: 0,
            pad_multiple: 1,
        }
    }

    #[test]
    fn batches_pad_to_the_longest_rounded_up_to_the_multiple() {
        let t = tokenized(&[3, 5, 2]);
        assert_eq!(t.batch(&[0, 2]).inputs.seq, 3);
        let t = t.pad_to_multiple_of(4);
        assert_eq!(t.batch(&[0, 2]).inputs.seq, 4);
        assert_eq!(t.batch(&[1]).inputs.seq, 8);
        let b = t.batch(&[0, 2]).inputs;
        assert_eq!(b.input_ids, vec![1, 2, 3, 0, 1, 2, 0, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 0, 1, 1, 0, 0]);
    }

    #[test]
    fn padding_keeps_rows_and_masks_the_rest() {
        let b = HostBatch {
            input_ids: vec![101, 7, 102, 101, 102, 0],
            attention_mask: vec![1, 1, 1, 1, 1, 0],
            token_type_ids: vec![0, 0, 0, 0, 0, 0],
            batch: 2,
            seq: 3,
        };
        let p = b.pad_to(5, 0);
        assert_eq!(p.seq, 5);
        assert_eq!(p.input_ids, vec![101, 7, 102, 0, 0, 101, 102, 0, 0, 0]);
        assert_eq!(p.attention_mask, vec![1, 1, 1, 0, 0, 1, 1, 0, 0, 0]);
        assert_eq!(b.pad_to(2, 0), b, "never shortens");
    }
}
