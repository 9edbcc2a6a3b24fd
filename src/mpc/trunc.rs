//! Exact (faithful) truncation: `x / 2^d` on additive shares, within one unit in the last place
//! for every `|x| < 2^62`, in **one round** of one bit per element each way.
//!
//! # Why
//!
//! SecureML's local truncation ([`AShare::truncate`]) fails with probability `|x| / 2^64` per
//! element, and a failure is off by about `2^(64−d)`: garbage that reaches the client unnoticed.
//! A BERT-base forward truncates 10⁷–10⁸ elements; the teacher's exp squarings alone put the
//! chance of one failure per forward at up to 7 % at length 512.
//!
//! # Derivation
//!
//! Let `X` be the secret as a signed integer, `−2^62 ≤ X < 2^62`, shared as
//! `x0 + x1 ≡ X (mod 2^64)`, and `1 ≤ d ≤ 62`.
//!
//! 1. **Bias.** P0 adds the public `2^62`: `y0 = x0 + 2^62`, so `y = X + 2^62 ∈ [0, 2^63)` —
//!    non-negative with a known top bit 0. P1 negates its share, `y1' = −x1`, so that
//!    `y ≡ y0 − y1' (mod 2^64)` with `y0, y1' ∈ [0, 2^64)`.
//! 2. **Local shifts** (SecureML's, on the biased value): `t0 = ⌊y0 / 2^d⌋`,
//!    `t1 = −⌊y1' / 2^d⌋`. Over the integers `y0 − y1' = y − b·2^64` with the borrow
//!    `b = [y0 < y1']`, and `⌊y0/2^d⌋ − ⌊y1'/2^d⌋ = ⌊(y0 − y1')/2^d⌋ + ε` with
//!    `ε = [y0 mod 2^d < y1' mod 2^d] ∈ {0, 1}`. So `t0 + t1 = ⌊y/2^d⌋ − b·2^(64−d) + ε`:
//!    SecureML's result is off by `b·2^(64−d)` exactly when the borrow occurs.
//! 3. **The borrow from the top bits.** Let `a = y0[63]` (P0's) and `a' = y1'[63]` (P1's). As
//!    `y0 − y1'` is either `y ∈ [0, 2^63)` or `y − 2^64 ∈ [−2^64, −2^63)`: if `a = a'` both lie
//!    in the same half, `|y0 − y1'| < 2^63` and `b = 0`; if `a = 1, a' = 0`, `y0 > y1'` and
//!    `b = 0`; if `a = 0, a' = 1`, `y0 < y1'` and `b = 1`. Hence **`b = (1 − a)·a'`**, the
//!    product of a bit only P0 knows and a bit only P1 knows (the known top bit of `y` is what
//!    spares the general comparison's carry tree: SIRNN's "MSB-to-wrap" observation).
//! 4. **The product in one round** ([`Op::OwnedBitAnd`]) with the dealer's shared random bit
//!    `r = r0 ⊕ r1 = R0 + R1` (the B2A material): P0 opens `u = p ⊕ r0`, P1 opens `v = q ⊕ r1`
//!    (each a one-time pad: `r0` is independent of P1's view and `r1` of P0's), and the parties
//!    hold shares of `2pq` (see `owned_bit_and_share` in [`super::protocols`]). Shares of
//!    `b·2^(64−d)` are those of `2pq` times `2^(63−d)`.
//! 5. **Result**: `z = t0 + t1 + b·2^(64−d) − 2^(62−d)` (P0 subtracts the bias' shifted value)
//!    `= ⌊y/2^d⌋ + ε − 2^(62−d) = ⌊X/2^d⌋ + ε`: **`⌊X/2^d⌋` or `⌊X/2^d⌋ + 1`, never more** —
//!    the same one-ulp rounding as SecureML's when it does not fail, and `ε = 1` with
//!    probability `(X mod 2^d)/2^d` (uniform `x0`), so the rounding is unbiased.
//!
//! Outside `[−2^62, 2^62)` the top bit of `y` is not 0 and the result is wrong — for a product
//! of two fixed-point values that is `|v| ≥ 2^(62−2f)` (2^30 at f = 16), beyond what the
//! fixed-point encoding of the product could hold anyway (2^31). Like SecureML's, the output
//! shares are not re-randomised: each is a function of its party's view, and every later round
//! opens only values masked by fresh dealer randomness.
//!
//! # Where it is used
//!
//! [`Truncation::Exact`] (the default) runs it at every **hot spot**: a truncation of one value
//! per token and feature or per attention score, where the local truncation's failure
//! probability adds up over a forward pass — every linear layer's output, `QKᵀ` and `P·V`,
//! every squaring of the teacher's exp, 2Quad's squares and their row sums, Quad's square, the
//! products inside GeLU's polynomial (and `x/T`, `(x/T)²`), LayerNorm's row sums of squares,
//! `(x − μ)∘γ`, variance and output. Each costs one round more ([`Truncation::rounds`]; the
//! truncations of one round share it). What stays local is per row or per sequence (Newton
//! steps of the reciprocals and inverse square roots, means, the pooler's tanh), values whose
//! probabilities sum to one per row (the softmax's and 2Quad's last product), and shifts of
//! values at f bits (`x/2^n` before exp, `x/2` in GeLU): ~10⁵–10⁶ truncations of O(1) values
//! per BERT-base forward at length 512 instead of ~10⁸ (docs/src/secure-inference.md, "Limits").

use super::protocols::{Ctx, Op};
use super::share::{AShare, BShare, truncate_elem};
use super::{MpcError, Party, Result};
use crate::mpc::dealer::bit_words;
use crate::mpc::ring::RingTensor;

/// How the hot spots truncate (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// SecureML's local truncation everywhere: no communication, fails with probability
    /// `|x|/2^64` per element.
    Local,
    /// The exact truncation at the hot spots: one more round each, never a large error.
    #[default]
    Exact,
}

impl Truncation {
    /// Rounds one hot-spot truncation costs (a batch of them shares its round).
    pub fn rounds(self) -> u32 {
        match self {
            Truncation::Local => 0,
            Truncation::Exact => 1,
        }
    }

    /// `local` or `exact`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "local" => Ok(Truncation::Local),
            "exact" => Ok(Truncation::Exact),
            _ => Err(MpcError::Config(format!(
                "truncation must be 'local' or 'exact', got '{s}'"
            ))),
        }
    }
}

/// The public bias that makes every value in range non-negative with top bit 0.
const BIAS: u64 = 1 << 62;

/// Largest shift the exact truncation supports (`2^(62−d)` must be an integer).
pub const MAX_EXACT_BITS: u32 = 62;

/// This party's locally shifted share of the biased value (step 2 of the derivation) and its
/// bit of the borrow's product (step 3: `p = 1 − y0[63]` at P0, `q = (−x1)[63]` at P1).
fn shift_and_borrow_bit(party: Party, x: u64, bits: u32) -> (u64, u64) {
    match party {
        Party::P0 => {
            let y0 = x.wrapping_add(BIAS);
            (y0 >> bits, 1 ^ (y0 >> 63))
        }
        Party::P1 => (truncate_elem(Party::P1, x, bits), x.wrapping_neg() >> 63),
    }
}

/// Packs the low bit of each value into a dense bit stream (64 to a word).
fn pack_bits(bits: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; bit_words(bits.len())];
    for (j, &b) in bits.iter().enumerate() {
        out[j / 64] |= (b & 1) << (j % 64);
    }
    out
}

impl Ctx {
    /// `x / 2^bits`, exact to one ulp for `|x| < 2^62` ring units (1 round; see the module
    /// docs).
    pub fn truncate_exact(&mut self, x: &AShare, bits: u32) -> Result<AShare> {
        Ok(self.truncate_exact_many(&[(x, bits)])?.remove(0))
    }

    /// Several exact truncations, each by its own shift, in **one** round (none if every shift
    /// is 0: that is the identity).
    pub fn truncate_exact_many(&mut self, xs: &[(&AShare, u32)]) -> Result<Vec<AShare>> {
        let party = self.party;
        if let Some((_, b)) = xs.iter().find(|(_, b)| *b > MAX_EXACT_BITS) {
            return Err(MpcError::Config(format!(
                "exact truncation by {b} bits: at most {MAX_EXACT_BITS}"
            )));
        }
        let active = || xs.iter().filter(|(_, b)| *b > 0);
        let n: usize = active().map(|(x, _)| x.numel()).sum();
        let mut shifted = Vec::with_capacity(n);
        let mut own = Vec::with_capacity(n);
        for (x, bits) in active() {
            for &v in &x.t.data {
                let (t, b) = shift_and_borrow_bit(party, v, *bits);
                shifted.push(t);
                own.push(b);
            }
        }
        let own = BShare::new(party, pack_bits(&own));
        let two_b = if n == 0 {
            Vec::new()
        } else {
            self.run(&[Op::OwnedBitAnd(&own, n)])?.remove(0).t.data
        };
        let mut out = Vec::with_capacity(xs.len());
        let mut at = 0;
        for (x, bits) in xs {
            if *bits == 0 {
                out.push((*x).clone());
                continue;
            }
            let data = (at..at + x.numel())
                .map(|j| {
                    // 2b·2^(63−d) = b·2^(64−d); P0 removes the bias, shifted.
                    let fix = two_b[j].wrapping_shl(63 - bits);
                    let z = shifted[j].wrapping_add(fix);
                    match party {
                        Party::P0 => z.wrapping_sub(BIAS >> bits),
                        Party::P1 => z,
                    }
                })
                .collect();
            at += x.numel();
            out.push(AShare::new(
                party,
                RingTensor::new(x.shape().to_vec(), data)?,
            ));
        }
        Ok(out)
    }

    /// Truncation at a hot spot: exact or local per [`Ctx::truncation`].
    pub fn truncate_hot(&mut self, x: &AShare, bits: u32) -> Result<AShare> {
        Ok(self.truncate_hot_many(&[(x, bits)])?.remove(0))
    }

    /// [`Ctx::truncate_hot`] of several shares in one round.
    pub fn truncate_hot_many(&mut self, xs: &[(&AShare, u32)]) -> Result<Vec<AShare>> {
        match self.truncation {
            Truncation::Local => Ok(xs.iter().map(|(x, b)| x.truncate(*b)).collect()),
            Truncation::Exact => self.truncate_exact_many(xs),
        }
    }
}
