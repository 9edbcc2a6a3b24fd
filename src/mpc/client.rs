//! `mpc client`: P1, the data owner, against an `mpc serve`. It reads only the export's public
//! part (config, tokenizer, plans), tokenises its sentences locally, sends them in batches
//! padded to a few bucket lengths, and turns the logits it alone receives into labels and
//! probabilities.
//!
//! Why buckets: a session's shapes are public anyway (P1 announces each batch's shape and
//! attention mask, as in CrypTen), but a handful of fixed lengths makes the server's work per
//! batch predictable and lets every batch of a bucket reuse one plan; `--buckets none` pads
//! each batch to its longest sentence only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::Party;
use super::model::{Input, MpcConfig, PartyReport, run_party};
use super::session::{Security, SessionId, connect_dealer, connect_p0};
use crate::data::{Order, plan_batches};
use crate::tokenize::{Encoded, HostBatch, TextTokenizer};

/// Default bucket lengths (capped by the model's maximum length).
pub const DEFAULT_BUCKETS: [usize; 6] = [16, 32, 64, 128, 256, 512];

/// The export directory P1 reads: `<export>/p1/` when the export has one, else the directory
/// itself (already a public part, or an older export).
pub fn public_dir(model: &Path) -> PathBuf {
    let p1 = model.join(crate::export::format::P1_DIR);
    if p1.join(crate::export::format::PUBLIC_MANIFEST).is_file() {
        p1
    } else {
        model.to_path_buf()
    }
}

/// The longest input the export was made for (its manifest's `max_length`).
pub fn max_length(dir: &Path) -> anyhow::Result<usize> {
    let path = [
        crate::export::format::PUBLIC_MANIFEST,
        crate::export::format::MANIFEST,
    ]
    .iter()
    .map(|f| dir.join(f))
    .find(|p| p.is_file())
    .ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no {} or {} (is it an export, or its p1/ part?)",
            dir.display(),
            crate::export::format::PUBLIC_MANIFEST,
            crate::export::format::MANIFEST
        )
    })?;
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let m: crate::export::format::PublicManifest =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(m.max_length)
}

/// One sentence or sentence pair to classify.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Query {
    pub text: String,
    pub text_pair: Option<String>,
}

/// The batches of a session and, for each row in batch order, the query it holds.
#[derive(Debug, Clone)]
pub struct Plan {
    pub batches: Vec<HostBatch>,
    pub order: Vec<usize>,
}

/// The smallest bucket that holds `len` tokens; past the last bucket, `len` itself.
pub fn bucket_len(len: usize, buckets: &[usize]) -> usize {
    buckets.iter().copied().find(|&b| b >= len).unwrap_or(len)
}

/// Tokenises `queries` and groups them by length into batches of `batch_size`, each padded to
/// its bucket (`buckets` empty: to its longest sentence). Buckets past the tokenizer's maximum
/// length are dropped, and that length is the last bucket.
pub fn plan(
    tok: &TextTokenizer,
    queries: &[Query],
    batch_size: usize,
    buckets: &[usize],
) -> Result<Plan, String> {
    if queries.is_empty() {
        return Err("no sentences to classify".into());
    }
    let encoded: Vec<Encoded> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            tok.encode(&q.text, q.text_pair.as_deref())
                .map_err(|e| format!("sentence {}: tokenising: {e}", i + 1))
        })
        .collect::<Result<_, _>>()?;
    let mut caps: Vec<usize> = buckets
        .iter()
        .copied()
        .filter(|&b| b < tok.max_len)
        .collect();
    if !buckets.is_empty() {
        caps.push(tok.max_len);
    }
    let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
    let mut out = Plan {
        batches: Vec::new(),
        order: Vec::new(),
    };
    for idx in plan_batches(&lengths, batch_size.max(1), Order::ByLength, false) {
        let refs: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
        let b = HostBatch::collate(&refs, tok.pad_id);
        out.batches
            .push(b.pad_to(bucket_len(b.seq, &caps), tok.pad_id));
        out.order.extend(idx);
    }
    Ok(out)
}

/// One query's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub index: usize,
    /// The label name (`id2label`), or its id when the export names none; `None` for a
    /// regression head.
    pub label: Option<String>,
    /// Softmax of the logits (classification).
    pub probabilities: Vec<f64>,
    /// The score of a regression head.
    pub score: Option<f64>,
    pub logits: Vec<f64>,
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Predictions in query order from logits in batch order (`order[row]` = the query of a row).
pub fn predictions(logits: &[f64], order: &[usize], cfg: &MpcConfig) -> Vec<Prediction> {
    let k = cfg.model.num_labels.max(1);
    let mut out: Vec<Option<Prediction>> = vec![None; order.len()];
    for (row, &q) in order.iter().enumerate() {
        let l = logits[row * k..(row + 1) * k].to_vec();
        let p = if cfg.model.is_regression() {
            Prediction {
                index: q,
                label: None,
                probabilities: Vec::new(),
                score: Some(l[0]),
                logits: l,
            }
        } else {
            let probs = softmax(&l);
            let best = (0..k).fold(0, |b, j| if probs[j] > probs[b] { j } else { b });
            Prediction {
                index: q,
                label: Some(
                    cfg.model
                        .labels
                        .get(best)
                        .cloned()
                        .unwrap_or_else(|| best.to_string()),
                ),
                probabilities: probs,
                score: None,
                logits: l,
            }
        };
        out[q] = Some(p);
    }
    out.into_iter()
        .map(|p| p.expect("every query is in one batch"))
        .collect()
}

/// Runs one session as P1 against `mpc serve` at `peer` with the dealer at `dealer`; `begun`
/// hears the session id once both links stand.
pub fn run_session(
    cfg: MpcConfig,
    sec: &Security,
    peer: &str,
    dealer: &str,
    batches: &[HostBatch],
    timeout: Duration,
    begun: impl FnOnce(SessionId),
) -> super::Result<PartyReport> {
    let settings = cfg.settings();
    let inputs: Vec<Input> = batches.iter().map(Input::from_host).collect();
    let (chan, sid) = connect_p0(peer, sec, &settings, timeout)?;
    let dealer = connect_dealer(dealer, sec, Party::P1, sid, None, timeout)?;
    begun(sid);
    run_party(Party::P1, cfg, None, Some(&inputs), Box::new(chan), dealer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_pick_the_smallest_that_fits() {
        let b = [16, 32, 64];
        assert_eq!(bucket_len(1, &b), 16);
        assert_eq!(bucket_len(16, &b), 16);
        assert_eq!(bucket_len(17, &b), 32);
        assert_eq!(bucket_len(65, &b), 65);
        assert_eq!(bucket_len(7, &[]), 7);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 3.0, -2.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[1] > p[0] && p[0] > p[2]);
        // e^2 / (1 + e^2 + e^-3) for the largest, computed apart.
        let want = 2f64.exp() / (1.0 + 2f64.exp() + (-3f64).exp());
        assert!((p[1] - want).abs() < 1e-12);
    }
}
