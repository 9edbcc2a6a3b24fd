//! Transfer data for stage 1: unlabelled text the teacher is run on, so the student matches its
//! hidden states and attention on more inputs than the task's training set (TinyBERT's
//! observation; stage 1 needs the teacher's outputs, never labels).
//!
//! - Pair tasks get **re-paired** examples: the first text of one training example with the
//!   second text of another, so both sides stay in the task's domain.
//! - Single-sentence tasks get **other sentences**: the sentences of other corpora's training
//!   texts (reviews are split into sentences), e.g. SST-2 and IMDb for CoLA.
//! - Any task can get **neighbour-word copies** of its own training examples, TinyBERT's data
//!   augmentation: each word replaced with probability 0.4 by one of its 15 nearest words.
//!   TinyBERT ranks neighbours with BERT's masked-LM head and GloVe; a fine-tuned teacher may
//!   have no MLM head (all-MiniLM-L6-v2 ships none), so the ranking here is the cosine of the
//!   pretrained model's input word embeddings ([`WordNeighbours`]), the same for every seed. These copies stay next to the
//!   task's inputs, where the student must follow the teacher's decision, which unrelated
//!   sentences and random pairs do not.
//!
//! Every draw is a function of the seed alone.

use std::collections::{BTreeSet, HashMap};

use burn::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::Example;

/// TinyBERT's augmentation settings (`p_t`, `K` in its Algorithm 1).
pub const REPLACE_P: f64 = 0.4;
pub const NEIGHBOURS: usize = 15;

/// `n` re-paired examples: `(a_i, b_j)` with `i ≠ j`, drawn uniformly.
pub fn repaired(train: &[Example], n: usize, seed: u64) -> Vec<Example> {
    let pairs: Vec<(&str, &str)> = train
        .iter()
        .filter_map(|e| Some((e.text_a.as_str(), e.text_b.as_deref()?)))
        .collect();
    if pairs.len() < 2 {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pick = |len: usize| (rng.next_u64() % len as u64) as usize;
    (0..n)
        .map(|k| {
            let i = pick(pairs.len());
            // j ≠ i: an offset in 1..len.
            let j = (i + 1 + pick(pairs.len() - 1)) % pairs.len();
            unlabelled(pairs[i].0, Some(pairs[j].1), k)
        })
        .collect()
}

/// Up to `n` sentences drawn uniformly from the texts of `sources`, each of 3 to 60 words.
pub fn sentences(sources: &[Example], n: usize, seed: u64) -> Vec<Example> {
    let mut pool: Vec<&str> = sources
        .iter()
        .flat_map(|e| std::iter::once(&e.text_a).chain(&e.text_b))
        .flat_map(|t| split_sentences(t))
        .filter(|s| (3..=60).contains(&s.split_whitespace().count()))
        .collect();
    pool.sort_unstable();
    pool.dedup();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // A partial Fisher–Yates shuffle: the first `n` are a uniform draw without replacement.
    let take = n.min(pool.len());
    for i in 0..take {
        let j = i + (rng.next_u64() % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool[..take]
        .iter()
        .enumerate()
        .map(|(k, s)| unlabelled(s, None, k))
        .collect()
}

/// Sentences of `text`: split after `.`, `!` or `?` followed by a space, and at IMDb's `<br />`.
fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for part in text.split("<br />") {
        let mut start = 0;
        let bytes = part.as_bytes();
        for (i, w) in bytes.windows(2).enumerate() {
            if matches!(w[0], b'.' | b'!' | b'?') && w[1] == b' ' {
                out.push(part[start..=i].trim());
                start = i + 2;
            }
        }
        out.push(part[start..].trim());
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The nearest whole-word vocabulary entries of a corpus's words, by the cosine of a model's
/// input word embeddings. A word the vocabulary splits into pieces has no entry and is never
/// replaced (TinyBERT falls back to GloVe there).
pub struct WordNeighbours {
    table: HashMap<String, Vec<String>>,
}

impl WordNeighbours {
    /// Neighbours for every word of `texts` that is a whole-word entry of `vocab` (WordPiece:
    /// not a `##` piece; byte-level BPE: a `Ġ`-prefixed entry), `k` each, nearest first.
    /// `embeddings` is the `[vocab, hidden]` input embedding table.
    pub fn new<'a>(
        vocab: &HashMap<String, u32>,
        embeddings: Tensor<2>,
        texts: impl IntoIterator<Item = &'a str>,
        k: usize,
    ) -> Result<Self, String> {
        let [rows, _] = embeddings.dims();
        let bpe = vocab.keys().any(|t| t.starts_with('Ġ'));
        // Whole words, in id order so ties break the same way every run.
        let mut words: Vec<(u32, &str)> = vocab
            .iter()
            .filter_map(|(t, &id)| Some((id, word_form(t, bpe)?)))
            .filter(|&(id, _)| (id as usize) < rows)
            .collect();
        words.sort_unstable();
        if words.len() <= k {
            return Err(format!(
                "the vocabulary has {} whole words, too few for {k} neighbours each",
                words.len()
            ));
        }
        let index: HashMap<&str, usize> = words.iter().enumerate().map(|(i, w)| (w.1, i)).collect();
        let queries: Vec<usize> = texts
            .into_iter()
            .flat_map(str::split_whitespace)
            .filter_map(|w| lookup(&index, core_of(w).1))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let device = embeddings.device();
        let ids = |v: Vec<i64>| {
            Tensor::<1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &device)
        };
        let unit = {
            let e = embeddings.select(0, ids(words.iter().map(|w| w.0 as i64).collect()));
            let norm = e
                .clone()
                .powf_scalar(2.0)
                .sum_dim(1)
                .sqrt()
                .clamp_min(1e-12);
            e / norm
        };
        let mut table = HashMap::with_capacity(queries.len());
        // Chunks of queries bound the similarity block to chunk × vocabulary floats.
        for chunk in queries.chunks(1024) {
            let q = unit
                .clone()
                .select(0, ids(chunk.iter().map(|&i| i as i64).collect()));
            let sims = q
                .matmul(unit.clone().transpose())
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| format!("similarities: {e:?}"))?;
            for (row, &qi) in sims.chunks_exact(words.len()).zip(chunk) {
                let near = nearest(row, qi, k);
                table.insert(
                    words[qi].1.to_string(),
                    near.into_iter().map(|j| words[j].1.to_string()).collect(),
                );
            }
        }
        Ok(Self { table })
    }

    /// The neighbours of `word` (as written or lower-cased), nearest first.
    pub fn of(&self, word: &str) -> Option<&[String]> {
        self.table
            .get(word)
            .or_else(|| self.table.get(&word.to_lowercase()))
            .map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// The word a vocabulary entry stands for when it starts a word: letters only, two or more.
fn word_form(token: &str, bpe: bool) -> Option<&str> {
    let w = if bpe {
        token.strip_prefix('Ġ')?
    } else if token.starts_with("##") {
        return None;
    } else {
        token
    };
    (w.chars().count() >= 2 && w.chars().all(char::is_alphabetic)).then_some(w)
}

fn lookup(index: &HashMap<&str, usize>, w: &str) -> Option<usize> {
    index
        .get(w)
        .or_else(|| index.get(w.to_lowercase().as_str()))
        .copied()
}

/// A whitespace token split into leading punctuation, the word, trailing punctuation.
fn core_of(token: &str) -> (&str, &str, &str) {
    let start = token.find(char::is_alphanumeric).unwrap_or(token.len());
    let end = token.rfind(char::is_alphanumeric).map_or(start, |i| {
        i + token[i..].chars().next().map_or(1, char::len_utf8)
    });
    (&token[..start], &token[start..end], &token[end..])
}

/// Indices of the `k` largest entries of `row` other than `skip`, largest first (ties: lower
/// index first).
fn nearest(row: &[f32], skip: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).filter(|&j| j != skip).collect();
    let by = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    if idx.len() > k {
        idx.select_nth_unstable_by(k, by);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by);
    idx
}

/// `n` copies of training examples (each example in turn, in a seeded order) with every word
/// replaced, with probability `p`, by one of its neighbours drawn uniformly. Both texts of a
/// pair are perturbed; punctuation around a word and a leading capital are kept.
pub fn neighbour_copies(
    train: &[Example],
    n: usize,
    p: f64,
    neighbours: &WordNeighbours,
    seed: u64,
) -> Vec<Example> {
    if train.is_empty() {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    (0..n)
        .map(|k| {
            let pos = k % train.len();
            if pos == 0 {
                // A fresh shuffle per pass over the training set.
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
            }
            let e = &train[order[pos]];
            let a = perturb(&e.text_a, p, neighbours, &mut rng);
            let b = e
                .text_b
                .as_deref()
                .map(|b| perturb(b, p, neighbours, &mut rng));
            unlabelled(&a, b.as_deref(), k)
        })
        .collect()
}

fn perturb(text: &str, p: f64, neighbours: &WordNeighbours, rng: &mut ChaCha8Rng) -> String {
    let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    text.split_whitespace()
        .map(|token| {
            let (pre, word, post) = core_of(token);
            match neighbours.of(word) {
                Some(near) if !near.is_empty() && uniform() < p => {
                    let pick =
                        &near[((uniform() * near.len() as f64) as usize).min(near.len() - 1)];
                    format!("{pre}{}{post}", with_case_of(word, pick))
                }
                _ => token.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `new` with `old`'s leading capital, for vocabularies that are lower-cased.
fn with_case_of(old: &str, new: &str) -> String {
    let capital = old.chars().next().is_some_and(char::is_uppercase);
    let mut c = new.chars();
    match c.next() {
        Some(f) if capital && f.is_lowercase() => f.to_uppercase().chain(c).collect(),
        _ => new.to_string(),
    }
}

fn unlabelled(a: &str, b: Option<&str>, k: usize) -> Example {
    Example {
        text_a: a.to_string(),
        text_b: b.map(str::to_string),
        label: None,
        id: format!("transfer-{k}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(a: &str, b: Option<&str>) -> Example {
        unlabelled(a, b, 0)
    }

    #[test]
    fn repaired_pairs_never_rebuild_a_training_pair() {
        let train: Vec<Example> = (0..5)
            .map(|i| ex(&format!("a{i}"), Some(&format!("b{i}"))))
            .collect();
        let out = repaired(&train, 200, 7);
        assert_eq!(out.len(), 200);
        for e in &out {
            let (a, b) = (&e.text_a[1..], &e.text_b.as_ref().unwrap()[1..]);
            assert_ne!(a, b, "{e:?} is a training pair");
            assert!(e.label.is_none());
        }
        // Every first text is used: the draw is uniform, not stuck.
        for i in 0..5 {
            assert!(out.iter().any(|e| e.text_a == format!("a{i}")));
        }
        assert_eq!(repaired(&train, 200, 7), out);
        assert_ne!(repaired(&train, 200, 8), out);
    }

    #[test]
    fn sentences_are_split_filtered_and_drawn_without_repeats() {
        let sources = vec![
            ex(
                "A fine film. Too long!<br />Would I see it again? yes. One two three four.",
                None,
            ),
            ex("One two three four.", None),
        ];
        let all = sentences(&sources, 100, 1);
        let mut texts: Vec<&str> = all.iter().map(|e| e.text_a.as_str()).collect();
        texts.sort();
        // "Too long!" and "yes." have under 3 words; the duplicate sentence appears once.
        assert_eq!(
            texts,
            [
                "A fine film.",
                "One two three four.",
                "Would I see it again?"
            ]
        );
        assert_eq!(sentences(&sources, 2, 1).len(), 2);
        assert_eq!(sentences(&sources, 2, 1), sentences(&sources, 2, 1));
    }

    /// Words on the unit circle at the given angles (degrees), plus entries that are not whole
    /// words. Neighbours by cosine are then neighbours by angle.
    fn circle_vocab(words: &[(&str, f64)]) -> (HashMap<String, u32>, Tensor<2>) {
        let mut vocab: HashMap<String, u32> = HashMap::new();
        let mut rows = Vec::new();
        for (i, (w, deg)) in words.iter().enumerate() {
            vocab.insert(w.to_string(), i as u32);
            let r = deg.to_radians();
            // Lengths differ: the cosine must not care.
            let len = 1.0 + i as f64;
            rows.extend([(len * r.cos()) as f32, (len * r.sin()) as f32]);
        }
        let t = Tensor::<2>::from_data(TensorData::new(rows, [words.len(), 2]), &Device::flex());
        (vocab, t)
    }

    /// The `k` nearest by brute force in f64, from the angles themselves.
    fn by_angle(words: &[(&str, f64)], of: &str, k: usize) -> Vec<String> {
        let a = words.iter().find(|w| w.0 == of).unwrap().1.to_radians();
        let mut others: Vec<(f64, usize, &str)> = words
            .iter()
            .enumerate()
            .filter(|(_, w)| w.0 != of && word_form(w.0, false).is_some())
            .map(|(i, w)| (-(w.1.to_radians() - a).cos(), i, w.0))
            .collect();
        others.sort_by(|x, y| x.partial_cmp(y).unwrap());
        others.iter().take(k).map(|o| o.2.to_string()).collect()
    }

    const WORDS: [(&str, f64); 9] = [
        ("[PAD]", 0.0),
        ("cat", 10.0),
        ("dog", 14.0),
        ("##s", 11.0),
        ("a", 12.0),
        ("lion", 30.0),
        ("car", 180.0),
        ("bus", 170.0),
        ("van", 200.0),
    ];

    #[test]
    fn neighbours_rank_whole_words_by_cosine() {
        let (vocab, emb) = circle_vocab(&WORDS);
        let n = WordNeighbours::new(&vocab, emb, ["The cat, a car!", "dogs lion"], 3).unwrap();
        // "dogs" is not a whole word; "a" has one letter; "The" is not in the vocabulary.
        assert_eq!(n.len(), 3);
        for w in ["cat", "car", "lion"] {
            assert_eq!(n.of(w).unwrap(), by_angle(&WORDS, w, 3).as_slice(), "{w}");
        }
        assert_eq!(n.of("cat").unwrap(), ["dog", "lion", "bus"]);
        assert_eq!(n.of("Car").unwrap(), n.of("car").unwrap());
        assert!(n.of("dog").is_none() && n.of("a").is_none());
        assert!(
            WordNeighbours::new(&vocab, Tensor::zeros([9, 2], &Device::flex()), ["cat"], 6)
                .is_err()
        );
    }

    #[test]
    fn bpe_vocabularies_use_word_initial_entries() {
        let words = [("Ġcat", 0.0), ("cat", 1.0), ("Ġdog", 5.0), ("Ġcar", 90.0)];
        let (vocab, emb) = circle_vocab(&words);
        let n = WordNeighbours::new(&vocab, emb, ["cat"], 2).unwrap();
        assert_eq!(n.of("cat").unwrap(), ["dog", "car"]);
    }

    #[test]
    fn neighbour_copies_replace_words_at_the_rate_asked() {
        let (vocab, emb) = circle_vocab(&WORDS);
        let text = "Cat: cat cat, (cat) cat cat cat cat";
        let train = vec![ex(text, Some("the car")), ex("lion", Some("van"))];
        let n = WordNeighbours::new(&vocab, emb, [text, "car lion van"], 3).unwrap();
        let out = neighbour_copies(&train, 400, REPLACE_P, &n, 5);
        assert_eq!(out.len(), 400);
        assert_eq!(out, neighbour_copies(&train, 400, REPLACE_P, &n, 5));
        assert_ne!(out, neighbour_copies(&train, 400, REPLACE_P, &n, 6));
        let (mut words, mut replaced) = (0, 0);
        for e in out.iter().filter(|e| e.text_a.split(' ').count() == 8) {
            assert!(e.label.is_none());
            // Each pass takes every example once.
            let b = e.text_b.as_deref().unwrap();
            let car = by_angle(&WORDS, "car", 3);
            assert!(
                b == "the car" || car.iter().any(|w| b == format!("the {w}")),
                "{b}"
            );
            for (old, new) in text.split(' ').zip(e.text_a.split(' ')) {
                let (pre, w, post) = core_of(old);
                let (npre, nw, npost) = core_of(new);
                assert_eq!((pre, post), (npre, npost), "{new}");
                words += 1;
                if nw != w {
                    replaced += 1;
                    let near = ["Dog", "Lion", "Bus", "dog", "lion", "bus"];
                    let allowed = if w == "Cat" { &near[..3] } else { &near[3..] };
                    assert!(allowed.contains(&nw), "{old} -> {new}");
                }
            }
        }
        // 200 copies × 8 words at p = 0.4: 640 expected, sd ≈ 18.
        assert_eq!(words, 1600);
        assert!((560..=720).contains(&replaced), "{replaced} of {words}");
        assert_eq!(
            out.iter()
                .filter(|e| e.text_a.starts_with("lion") || e.text_a.len() < 6)
                .count(),
            200
        );
    }
}
