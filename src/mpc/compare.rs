//! Comparison and the exact functions of the teacher (issue 9): `ltz`, ReLU, row max, exp,
//! softmax, GeLU and 2ReLU, on additive shares, with the dealer's binary material.
//!
//! # Comparison
//!
//! `x < 0` is the most significant bit of `x = x0 + x1 (mod 2^64)`. [`Ctx::msb`] computes it
//! over XOR (binary) shares of packed `u64` words, in **7 rounds**, vectorised over all elements:
//!
//! 1. **A2B for free**: `x0` is P0's and `x1` is P1's, so the adder's inputs need no sharing.
//!    Generate `G = x0 & x1` is one *owned* AND (each party opens only its own operand: one word
//!    per element each way); propagate `P = x0 ⊕ x1` is local (each party's own share). Bit 63 is
//!    set to `(G, P) = (0, 1)`, so the group generate of all 64 positions is the carry **into**
//!    bit 63.
//! 2. **Log-depth carry tree** (Kogge–Stone/Brent–Kung prefix, reduced to the one carry needed):
//!    6 levels, each combining adjacent pairs `(lo, hi)` as `G = G_hi ⊕ (P_hi & G_lo)`,
//!    `P = P_hi & P_lo` (`⊕` for `∨`: the two terms never both hold). Each level halves the bits
//!    per element, and the bits of all elements are packed densely (even/odd bit gathers are
//!    local), so a level costs half the previous: ≈ 4.9 words per element in all, against
//!    CrypTen's ≈ 21 (its Kogge–Stone keeps all 64 bits of every element at every level).
//! 3. `msb = x0[63] ⊕ x1[63] ⊕ carry`.
//!
//! [`Ctx::ltz`] adds **B2A** of the bit (1 round, one *bit* per element each way): the dealer's
//! shared random bit `r` in binary and arithmetic form; open `c = b ⊕ r`, then
//! `b = c + r − 2cr` (c public). So `ltz` is **8 rounds** and ≈ 39 bytes per element per party
//! (CrypTen ≈ 170). The result is an exact ring integer 0/1 — multiplying by it needs no
//! truncation, so ReLU (`x·(1 − ltz(x))`, 9 rounds) and the max (`a − (a − b)·[a < b]`) are
//! exact. Like CrypTen's, the comparison is exact for `|x| < 2^63` ring units, i.e.
//! `|x| < 2^(63 − f)` — the fixed-point limit.
//!
//! # Functions
//!
//! - [`Ctx::max_last`]: tree reduction over the last dimension, ⌈log2 L⌉ levels of 9 rounds.
//! - [`Ctx::exp_limit`]: `(1 + x/2^n)^(2^n)` (n squarings), for `x ≤ 0` down to `−2^n`
//!   ([`SoftmaxPlan::exp_iters`], CrypTen's n = 8 by default, more when the export's range of
//!   `x − max` needs it).
//! - [`Ctx::softmax`]: BERT's masked softmax, `exp(s − max)·m / Σ exp(s − max)·m`: masked keys
//!   get exactly 0 (plaintext: `exp(−10000)`); the max runs over real keys (masked entries are
//!   set to −10000 for it); the row sum lies in `[1, L]` (the max's own term is exactly 1), the
//!   range the reciprocal's [`NewtonPlan`] covers.
//! - [`Ctx::gelu`]: `GeLU(x) = [x ≥ T]·x + [−T ≤ x < T]·(x/2 + h(x))`, `h(x) = (x/2)·erf(x/√2)`
//!   (even, smooth) as a Chebyshev series in `2(x/T)² − 1` ([`GeluPlan`]); the two indicators
//!   come from one batched `ltz` of `x − T` and `x + T`. Exact outside `[−T, T]` up to
//!   `|GeLU(x) − relu(x)| ≤ T·Φ(−T)` (1.3·10⁻⁴ at T = 4), for any `|x|` below the fixed-point
//!   limit — unlike CrypTen's erf Taylor series, which diverges beyond `|x| ≈ 2.5`.
//! - [`Ctx::two_relu`]: `(relu(s)·m + ε/L) / (Σ relu(s)·m + ε)`; the reference's `ε = 10⁻¹²` is
//!   below one fixed-point unit, so a row with a nonzero sum gets `relu(s)·m / Σ` and a row whose
//!   scores are all ≤ 0 gets `1/L` (one more comparison, on the row sums).

use super::dealer::bit_words;
use super::protocols::{Ctx, NewtonPlan, Op, cheb_eval, cheb_interp};
use super::ring::RingTensor;
use super::share::{AShare, BShare};
use super::trunc::Truncation;
use super::{MpcError, Party, Result};
use crate::model::approx::MASK_NEG;

const BIT63: u64 = 1 << 63;

/// The even bits of `w` (bits 0, 2, …, 62) packed into the low 32 bits, in order.
#[inline]
pub fn even_bits(w: u64) -> u64 {
    let mut x = w & 0x5555_5555_5555_5555;
    x = (x | (x >> 1)) & 0x3333_3333_3333_3333;
    x = (x | (x >> 2)) & 0x0f0f_0f0f_0f0f_0f0f;
    x = (x | (x >> 4)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff;
    (x | (x >> 16)) & 0x0000_0000_ffff_ffff
}

/// Splits a stream of packed bits (fields of even width, word-aligned) into its even and odd
/// bits, each packed densely: word `i` of the input gives 32 bits at offset `32·(i mod 2)` of
/// word `i/2` of each output. Local and linear over XOR, so it applies to shares.
fn halve(words: &[u64]) -> (Vec<u64>, Vec<u64>) {
    let n = words.len().div_ceil(2);
    let (mut ev, mut od) = (vec![0u64; n], vec![0u64; n]);
    for (i, &w) in words.iter().enumerate() {
        let sh = 32 * (i % 2);
        ev[i / 2] |= even_bits(w) << sh;
        od[i / 2] |= even_bits(w >> 1) << sh;
    }
    (ev, od)
}

/// Packs bit 63 of each element into a dense bit stream.
fn pack_msbs(x: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; bit_words(x.len())];
    for (j, &v) in x.iter().enumerate() {
        out[j / 64] |= (v >> 63) << (j % 64);
    }
    out
}

/// Parameters of the masked softmax: exp iterations and the reciprocal of row sums in
/// `[1, L]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SoftmaxPlan {
    /// `n` of `(1 + x/2^n)^(2^n)`: valid for `x ≥ −2^n`.
    pub exp_iters: u32,
    /// Reciprocal of the row sums (`[0.5, max positions]`).
    pub recip: NewtonPlan,
}

/// The function a [`GeluPlan`] approximates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GeluKind {
    /// `x·Φ(x)` with erf (HF `gelu`).
    Erf,
    /// `0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))` (HF `gelu_new`).
    Tanh,
}

impl GeluKind {
    /// The exact function.
    pub fn eval(self, x: f64) -> f64 {
        match self {
            GeluKind::Erf => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            GeluKind::Tanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
            }
        }
    }
}

/// `erf` to ~1e-15 (W. J. Cody's rational approximations are overkill here: a series for
/// small |x|, the continued fraction's complement for large).
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        // Maclaurin series: 2/√π Σ (−1)^n x^(2n+1) / (n! (2n+1)).
        let mut term = a;
        let mut sum = a;
        let x2 = a * a;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc by Lentz's continued fraction.
        let x2 = a * a;
        let mut f = a;
        let mut c = a;
        let mut d = 0.0;
        for k in 1..200 {
            let an = k as f64 / 2.0;
            d = a + an * d;
            d = 1.0 / d;
            c = a + an / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-x2).exp() / (f * std::f64::consts::PI.sqrt())
    };
    if x < 0.0 { -r } else { r }
}

/// GeLU as `[x ≥ T]·x + [−T ≤ x < T]·(x/2 + h(x))` with `h(x) = GeLU(x) − x/2` (even, smooth) as
/// a Chebyshev series of degree `coeffs.len() − 1` in `s = 2(x/T)² − 1`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GeluPlan {
    pub kind: GeluKind,
    pub t: f64,
    pub coeffs: Vec<f64>,
    /// Max |error| against the exact function over all reals, in exact arithmetic: the series'
    /// error on `[−T, T]` or the tail `T·Φ(−T)`, whichever is larger.
    pub max_err: f64,
}

impl GeluPlan {
    /// Default: T = 4, degree 8 in `s` (16 in x): series error 4.9·10⁻⁵, tail 1.3·10⁻⁴.
    pub fn new(kind: GeluKind) -> Self {
        Self::with(kind, 4.0, 8)
    }

    pub fn with(kind: GeluKind, t: f64, degree: usize) -> Self {
        let h = move |s: f64| {
            let x = t * ((s + 1.0) / 2.0).max(0.0).sqrt();
            kind.eval(x) - x / 2.0
        };
        let coeffs = cheb_interp(h, degree);
        let approx = |x: f64| {
            if x >= t {
                x
            } else if x < -t {
                0.0
            } else {
                x / 2.0 + cheb_eval(&coeffs, 2.0 * (x / t) * (x / t) - 1.0)
            }
        };
        let max_err = (0..=20000)
            .map(|i| {
                let x = -2.0 * t + 4.0 * t * i as f64 / 20000.0;
                (approx(x) - kind.eval(x)).abs()
            })
            .fold(0.0, f64::max);
        Self {
            kind,
            t,
            coeffs,
            max_err,
        }
    }

    /// Rounds: 8 (comparison) + 1 (square) + ⌈log2 degree⌉ (series) + 1 (selection), plus the
    /// hot-spot truncations: `x/T` and `u²`, and 4 in the degree-8 polynomial ([`Ctx::poly8`]).
    pub fn rounds(&self, t: Truncation) -> u32 {
        let n = self.coeffs.len().saturating_sub(1).max(1);
        let hot = if self.coeffs.len() <= 9 { 2 + 4 } else { 2 };
        8 + 1 + (n as f64).log2().ceil() as u32 + 1 + hot * t.rounds()
    }
}

fn ring_ints(shape: &[usize], v: impl Iterator<Item = u64>) -> Result<RingTensor> {
    RingTensor::new(shape.to_vec(), v.collect())
}

impl Ctx {
    /// `x & y` on XOR shares (1 round).
    pub fn and(&mut self, x: &BShare, y: &BShare) -> Result<BShare> {
        let r = self.run(&[Op::And(x, y)])?.remove(0);
        Ok(BShare::new(self.party, r.t.data))
    }

    /// XOR shares of the sign bits of `x` (`x < 0`), packed 64 to a word: 7 rounds (see the
    /// module docs).
    pub fn msb(&mut self, x: &AShare) -> Result<BShare> {
        let party = self.party;
        let own = BShare::new(party, x.t.data.clone());
        // G = x0 & x1, bit 63 cleared.
        let g = self.run(&[Op::AndOwned(&own)])?.remove(0);
        let mut g = BShare::new(party, g.t.data).map(|w| w & !BIT63);
        // P = x0 ⊕ x1 with bit 63 set (P0 sets it, P1 clears it).
        let mut p = own.map(|w| match party {
            Party::P0 => w | BIT63,
            Party::P1 => w & !BIT63,
        });
        let mut width = 64;
        while width > 1 {
            let (ge, go) = halve(&g.words);
            let (pe, po) = halve(&p.words);
            let (ge, go, pe, po) = (
                BShare::new(party, ge),
                BShare::new(party, go),
                BShare::new(party, pe),
                BShare::new(party, po),
            );
            if width == 2 {
                let t = self.and(&po, &ge)?;
                g = go.xor(&t);
            } else {
                let r = self.run(&[Op::And(&po, &ge), Op::And(&po, &pe)])?;
                g = go.xor(&BShare::new(party, r[0].t.data.clone()));
                p = BShare::new(party, r[1].t.data.clone());
            }
            width /= 2;
        }
        // One bit per element now; keep exactly the bits of the n elements.
        let n = x.numel();
        let mut carry = g.words;
        carry.truncate(bit_words(n));
        carry.resize(bit_words(n), 0);
        let own_msb = pack_msbs(&x.t.data);
        Ok(BShare::new(
            party,
            carry.iter().zip(&own_msb).map(|(c, m)| c ^ m).collect(),
        ))
    }

    /// `n` packed XOR-shared bits as additively shared ring integers 0/1 (1 round).
    pub fn b2a(&mut self, bits: &BShare, n: usize) -> Result<AShare> {
        Ok(self.run(&[Op::B2A(bits, n)])?.remove(0))
    }

    /// `[x < 0]` as a shared ring **integer** 0/1 (not fixed point), shape of `x`: 8 rounds.
    pub fn ltz(&mut self, x: &AShare) -> Result<AShare> {
        let bits = self.msb(x)?;
        self.b2a(&bits, x.numel())?.reshape(x.shape())
    }

    /// `1 − b` for a shared integer bit `b` (local).
    pub fn not_bit(&self, b: &AShare) -> AShare {
        b.rsub_const(1)
    }

    /// `max(x, 0)`, exact (9 rounds): `x·(1 − [x < 0])`, the product with an integer bit needing
    /// no truncation.
    pub fn relu(&mut self, x: &AShare) -> Result<AShare> {
        let b = self.ltz(x)?;
        let nb = self.not_bit(&b);
        Ok(self.run(&[Op::Mul(x, &nb)])?.remove(0))
    }

    /// Max over the last dimension of `x` `[.., L]` → `[rows]`, exact: a tree of ⌈log2 L⌉
    /// levels, each `max(a, b) = a − (a − b)·[a < b]` (9 rounds).
    pub fn max_last(&mut self, x: &AShare) -> Result<AShare> {
        let party = self.party;
        let l = *x.shape().last().unwrap_or(&1);
        let rows = x.numel() / l.max(1);
        let mut cur = x.t.data.clone();
        let mut width = l;
        while width > 1 {
            let half = width / 2;
            let odd = width % 2;
            let (mut a, mut b) = (
                Vec::with_capacity(rows * half),
                Vec::with_capacity(rows * half),
            );
            for r in 0..rows {
                let row = &cur[r * width..(r + 1) * width];
                for j in 0..half {
                    a.push(row[2 * j]);
                    b.push(row[2 * j + 1]);
                }
            }
            let a = AShare::new(party, RingTensor::new(vec![rows * half], a)?);
            let b = AShare::new(party, RingTensor::new(vec![rows * half], b)?);
            let diff = a.sub(&b)?;
            let lt = self.ltz(&diff)?;
            let sel = self.run(&[Op::Mul(&diff, &lt)])?.remove(0);
            let m = a.sub(&sel)?;
            let nw = half + odd;
            let mut next = Vec::with_capacity(rows * nw);
            for r in 0..rows {
                next.extend_from_slice(&m.t.data[r * half..(r + 1) * half]);
                if odd == 1 {
                    next.push(cur[r * width + width - 1]);
                }
            }
            cur = next;
            width = nw;
        }
        Ok(AShare::new(party, RingTensor::new(vec![rows], cur)?))
    }

    /// `exp(x) ≈ (1 + x/2^n)^(2^n)` for `x ∈ [−2^n, 0]` (n rounds of squaring, each followed by
    /// a hot-spot truncation: `n·(1 + truncation rounds)`). Outside that range the base is
    /// negative and the result wrong (as CrypTen's): callers subtract the max and choose `n`
    /// from the range.
    pub fn exp_limit(&mut self, x: &AShare, n: u32) -> Result<AShare> {
        let f = self.f();
        let mut y = x.truncate(n).add_const(self.fp.one());
        for _ in 0..n {
            // 8 squares per attention score: the most truncations of any op in the teacher.
            let sq = self.run(&[Op::Square(&y)])?.remove(0);
            y = self.truncate_hot(&sq, f)?;
        }
        Ok(y)
    }

    /// BERT's softmax over the last dimension of `scores` `[B, H, Lq, Lk]` with the public 0/1
    /// key mask `[B, Lk]`, as [`crate::model::approx::Attn::apply`] computes it: masked keys get
    /// exactly 0. Rounds: ⌈log2 Lk⌉·9 (max) + n·(1 + truncation rounds) (exp) + reciprocal + 1.
    pub fn softmax(
        &mut self,
        scores: &AShare,
        key_mask: &[u64],
        plan: &SoftmaxPlan,
    ) -> Result<AShare> {
        let f = self.f();
        let s = scores.shape().to_vec();
        if s.len() != 4 || key_mask.len() != s[0] * s[3] {
            return Err(shape_err("softmax", &s, &[key_mask.len()]));
        }
        let (h, lq, lk) = (s[1], s[2], s[3]);
        let rows = s[0] * h * lq;
        let mask = ring_ints(
            &s,
            (0..rows * lk).map(|i| key_mask[(i / (h * lq * lk)) * lk + i % lk]),
        )?;
        // Masked entries: −10000 for the max (the reference's additive mask).
        let neg = self.enc(MASK_NEG);
        let fill = ring_ints(&s, mask.data.iter().map(|&m| if m == 1 { 0 } else { neg }))?;
        let xm = scores.mul_public(&mask)?.add_public(&fill)?;
        let mx = self.max_last(&xm.clone().reshape(&[rows, lk])?)?;
        let d: Vec<u64> =
            xm.t.data
                .iter()
                .enumerate()
                .map(|(i, v)| v.wrapping_sub(mx.t.data[i / lk]))
                .collect();
        let d = AShare::new(self.party, RingTensor::new(s.clone(), d)?).mul_public(&mask)?;
        let e = self.exp_limit(&d, plan.exp_iters)?.mul_public(&mask)?;
        let z: Vec<u64> =
            e.t.data
                .chunks(lk)
                .map(|r| r.iter().fold(0u64, |acc, v| acc.wrapping_add(*v)))
                .collect();
        let z = AShare::new(self.party, RingTensor::new(vec![rows], z)?);
        let w = self.reciprocal(&z, &plan.recip)?; // ≈ 2^shift / z
        let w = w.truncate(plan.recip.shift); // ≈ 1/z ∈ [1/L, 2]
        let e = e.reshape(&[rows, lk])?;
        let p = self.run(&[Op::MulRow(&e, &w)])?.remove(0).truncate(f);
        p.reshape(&s)
    }

    /// Chebyshev series `Σ c_k T_k(t)` of a shared `t` (f fractional bits, `|t| ≤ 1` where the
    /// result matters): ⌈log2 degree⌉ rounds, truncated once at the end.
    pub fn cheb_series(&mut self, t: &AShare, coeffs: &[f64]) -> Result<AShare> {
        let f = self.f();
        let n = coeffs.len().saturating_sub(1);
        let mut tk: Vec<AShare> = Vec::with_capacity(n + 1);
        tk.push(AShare::from_public(
            self.party,
            &RingTensor::new(t.shape().to_vec(), vec![self.fp.one(); t.numel()])?,
        ));
        tk.push(t.clone());
        let mut have = 1;
        while have < n {
            let a = have;
            let top = (2 * a).min(n);
            let idx: Vec<usize> = (a + 1..=top).collect();
            let r = {
                let ops: Vec<Op> = idx
                    .iter()
                    .map(|&k| {
                        if k == 2 * a {
                            Op::Square(&tk[a])
                        } else {
                            Op::Mul(&tk[a], &tk[k - a])
                        }
                    })
                    .collect();
                self.run(&ops)?
            };
            for (j, &k) in idx.iter().enumerate() {
                let prod = r[j].truncate(f).mul_public_int(2);
                tk.push(prod.sub(&tk[2 * a - k])?);
            }
            have = top;
        }
        let mut acc = RingTensor::zeros(t.shape());
        for (k, &c) in coeffs.iter().enumerate().skip(1) {
            if c.abs() < 1e-12 {
                continue;
            }
            acc.add_assign(&tk[k].t.mul_public_int(self.enc(c) as i64))?;
        }
        Ok(AShare::new(self.party, acc)
            .truncate(f)
            .add_const(self.enc(coeffs[0])))
    }

    /// `Σ_{j ≤ 8} a_j s^j` in 3 rounds and 5 products: `s²`; `s³`, `s⁴`; `s⁴·B(s)` with
    /// `p = A(s) + s⁴·B(s)`, `A` of degree 3 and `B` of degree 4 summed locally (the Chebyshev
    /// recurrence needs 9 products for degree 8). For `|s| ≤ 1` with modest coefficients.
    ///
    /// Every product is per element, so every truncation is a hot spot
    /// ([`Ctx::truncate_hot`]): `4·truncation rounds` more (`A` and `B` share theirs).
    pub fn poly8(&mut self, s: &AShare, a: &[f64]) -> Result<AShare> {
        let f = self.f();
        let mut a = a.to_vec();
        a.resize(9, 0.0);
        let s2 = self.run(&[Op::Square(s)])?.remove(0);
        let s2 = self.truncate_hot(&s2, f)?;
        let r = self.run(&[Op::Mul(s, &s2), Op::Square(&s2)])?;
        let mut r = self.truncate_hot_many(&[(&r[0], f), (&r[1], f)])?;
        let (s3, s4) = (r.remove(0), r.remove(0));
        let pw = [s, &s2, &s3, &s4];
        let lin = |ctx: &Ctx, c: &[f64]| -> Result<AShare> {
            let mut acc = RingTensor::zeros(s.shape());
            for (j, &cj) in c.iter().enumerate().skip(1) {
                if cj != 0.0 {
                    acc.add_assign(&pw[j - 1].t.mul_public_int(ctx.enc(cj) as i64))?;
                }
            }
            Ok(AShare::new(ctx.party, acc))
        };
        let (lo, hi) = (lin(self, &a[..4])?, lin(self, &a[4..9])?);
        let mut lh = self.truncate_hot_many(&[(&lo, f), (&hi, f)])?;
        let lo = lh.remove(0).add_const(self.enc(a[0]));
        let hi = lh.remove(0).add_const(self.enc(a[4]));
        let t = self.run(&[Op::Mul(&s4, &hi)])?.remove(0);
        lo.add(&self.truncate_hot(&t, f)?)
    }

    /// GeLU ([`GeluPlan`]): one batched `ltz` of `x − T` and `x + T` (8 rounds), the series of
    /// `h` in `2(x/T)² − 1` (1 + ⌈log2 degree⌉ rounds), and one round of two products with the
    /// integer indicators (no truncation).
    pub fn gelu(&mut self, x: &AShare, plan: &GeluPlan) -> Result<AShare> {
        let f = self.f();
        let n = x.numel();
        let party = self.party;
        // Indicators.
        let tt = self.enc(plan.t);
        let mut both = x.add_const(tt.wrapping_neg()).t.data;
        both.extend(x.add_const(tt).t.data);
        let both = AShare::new(party, RingTensor::new(vec![2 * n], both)?);
        let lt = self.ltz(&both)?; // [x < T], [x < −T]
        let below_t = AShare::new(
            party,
            RingTensor::new(x.shape().to_vec(), lt.t.data[..n].to_vec())?,
        );
        let below_mt = AShare::new(
            party,
            RingTensor::new(x.shape().to_vec(), lt.t.data[n..].to_vec())?,
        );
        let hi = self.not_bit(&below_t); // [x ≥ T]
        let inside = below_t.sub(&below_mt)?; // [−T ≤ x < T]
        // Series of h in s = 2u² − 1, u = x/T.
        let u = AShare::new(party, x.t.mul_public_int(self.enc(1.0 / plan.t) as i64));
        let u = self.truncate_hot(&u, f)?;
        let u2 = self.run(&[Op::Square(&u)])?.remove(0);
        let u2 = self.truncate_hot(&u2, f)?;
        let s = u2.mul_public_int(2).add_const(self.fp.one().wrapping_neg());
        let hs = if plan.coeffs.len() <= 9 {
            self.poly8(&s, &cheb_to_power(&plan.coeffs))?
        } else {
            self.cheb_series(&s, &plan.coeffs)?
        };
        let q = hs.add(&x.truncate(1))?; // x/2 + h(x)
        let r = self.run(&[Op::Mul(x, &hi), Op::Mul(&q, &inside)])?;
        r[0].add(&r[1])
    }

    /// MPCFormer's 2ReLU, `(relu(s)·m + ε/L) / (Σ relu(s)·m + ε)` over the last dimension of
    /// `scores` `[B, H, Lq, Lk]`, key mask `[B, Lk]`, as the plaintext model computes it;
    /// `plan` covers the nonzero row sums' range. `ε = 10⁻¹²` is below one fixed-point unit: a
    /// row whose sum is nonzero gets `relu(s)·m / Σ` (ε's effect is below 10⁻⁷), a row whose
    /// scores are all ≤ 0 gets `1/L` everywhere (masked keys too, as the reference). That case is
    /// told apart by one more comparison, on the row sums only (`[Σ < 1 unit]`, 8 rounds), which
    /// also keeps the reciprocal's input ≥ 1. Rounds: 9 (ReLU) + 8 + reciprocal + 1.
    pub fn two_relu(
        &mut self,
        scores: &AShare,
        key_mask: &[u64],
        plan: &NewtonPlan,
    ) -> Result<AShare> {
        let f = self.f();
        let s = scores.shape().to_vec();
        if s.len() != 4 || key_mask.len() != s[0] * s[3] {
            return Err(shape_err("2relu", &s, &[key_mask.len()]));
        }
        let (h, lq, lk) = (s[1], s[2], s[3]);
        let rows = s[0] * h * lq;
        let mask = ring_ints(
            &s,
            (0..rows * lk).map(|i| key_mask[(i / (h * lq * lk)) * lk + i % lk]),
        )?;
        let r = self.relu(scores)?.mul_public(&mask)?;
        let z: Vec<u64> =
            r.t.data
                .chunks(lk)
                .map(|c| c.iter().fold(0u64, |acc, v| acc.wrapping_add(*v)))
                .collect();
        let z = AShare::new(self.party, RingTensor::new(vec![rows], z)?);
        // ζ = [z = 0] (z ≥ 0 exactly: ReLU and the mask are exact).
        let zero = self.ltz(&z.add_const(1u64.wrapping_neg()))?;
        let one = self.fp.one() as i64;
        let z = z.add(&zero.mul_public_int(one))?;
        let w = self.reciprocal(&z, plan)?;
        let a_bits = plan.shift / 2;
        let e = r.truncate(a_bits).reshape(&[rows, lk])?;
        let w = w.truncate(plan.shift - a_bits);
        let p = self.run(&[Op::MulRow(&e, &w)])?.remove(0).truncate(f);
        // + ζ/L on every key of a zero row.
        let inv_l = self.enc(1.0 / lk as f64) as i64;
        let add = zero.mul_public_int(inv_l);
        let data: Vec<u64> =
            p.t.data
                .iter()
                .enumerate()
                .map(|(i, v)| v.wrapping_add(add.t.data[i / lk]))
                .collect();
        AShare::new(self.party, RingTensor::new(s, data)?).reshape(scores.shape())
    }
}

/// Power-basis coefficients of `Σ c_k T_k(s)`.
pub fn cheb_to_power(c: &[f64]) -> Vec<f64> {
    let n = c.len();
    let mut out = vec![0.0; n];
    let mut prev = vec![0.0; n]; // T_{k−1}
    let mut cur = vec![0.0; n]; // T_k
    if n == 0 {
        return out;
    }
    prev[0] = 1.0;
    out[0] += c[0];
    if n > 1 {
        cur[1] = 1.0;
        out[1] += c[1];
    }
    for ck in c.iter().skip(2) {
        let mut next = vec![0.0; n];
        for j in 0..n {
            if j > 0 {
                next[j] += 2.0 * cur[j - 1];
            }
            next[j] -= prev[j];
        }
        for j in 0..n {
            out[j] += ck * next[j];
        }
        prev = cur;
        cur = next;
    }
    out
}

fn shape_err(op: &str, lhs: &[usize], rhs: &[usize]) -> MpcError {
    MpcError::Shape {
        op: op.into(),
        lhs: lhs.to_vec(),
        rhs: rhs.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_gathers() {
        assert_eq!(even_bits(0b0111), 0b11);
        assert_eq!(even_bits(0b1010), 0);
        assert_eq!(even_bits(u64::MAX), u32::MAX as u64);
        let (e, o) = halve(&[0xAAAA_AAAA_AAAA_AAAA, 0x5555_5555_5555_5555]);
        assert_eq!(e, vec![0xFFFF_FFFF_0000_0000]);
        assert_eq!(o, vec![0x0000_0000_FFFF_FFFF]);
    }

    #[test]
    fn erf_and_gelu_plan() {
        for (x, want) in [
            (0.5, 0.520_499_877_813_046_5),
            (2.0, 0.995_322_265_018_952_7),
            (4.0, 0.999_999_984_582_742_1),
        ] {
            assert!((erf(x) - want).abs() < 1e-14, "erf({x})");
            assert!((erf(-x) + want).abs() < 1e-14);
        }
        let p = GeluPlan::new(GeluKind::Erf);
        assert!(p.max_err < 1.5e-4, "{}", p.max_err);
        let p = GeluPlan::new(GeluKind::Tanh);
        assert!(p.max_err < 1.5e-4, "{}", p.max_err);
        let a = cheb_to_power(&p.coeffs);
        for s in [-1.0, -0.3, 0.0, 0.7, 1.0] {
            let pw: f64 = a
                .iter()
                .enumerate()
                .map(|(j, c)| c * f64::powi(s, j as i32))
                .sum();
            assert!((pw - cheb_eval(&p.coeffs, s)).abs() < 1e-12);
        }
    }
}
