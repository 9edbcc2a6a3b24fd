//! Transfer data for stage 1: unlabelled text the teacher is run on, so the student matches its
//! hidden states and attention on more inputs than the task's training set (TinyBERT's
//! observation; stage 1 needs the teacher's outputs, never labels).
//!
//! - Pair tasks get **re-paired** examples: the first text of one training example with the
//!   second text of another, so both sides stay in the task's domain.
//! - Single-sentence tasks get **other sentences**: the sentences of other corpora's training
//!   texts (reviews are split into sentences), e.g. SST-2 and IMDb for CoLA.
//!
//! Both draws are a function of the seed alone.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::Example;

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
}
