//! Additive secret sharing over Z_2^64 and the local (communication-free) ops on shares.
//!
//! A secret `x` (a [`RingTensor`]) is held as `x = x0 + x1 (mod 2^64)`; party `i` holds `x_i` in
//! an [`AShare`]. [`AShare::share`] draws `x0` uniformly from a CSPRNG and sets `x1 = x − x0`, so
//! either share alone is uniform and independent of `x` (tested statistically in `tests/mpc.rs`).
//!
//! Local ops: add/sub/neg of two shares, adding a public value (only P0 adds it, so the sum of
//! the shares moves by exactly that value), multiplying by a public integer or a public ring
//! tensor (no rescaling), and SecureML's probabilistic truncation ([`AShare::truncate`]).

use std::fmt;

use rand_core::{RngCore, TryRngCore};

use super::ring::RingTensor;
use super::{MpcError, Party, Result};

/// 32 bytes from the operating system's CSPRNG (a PRG seed).
pub fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand_core::OsRng
        .try_fill_bytes(&mut seed)
        .expect("the operating system's random source is available");
    seed
}

/// One party's additive share of a ring tensor.
///
/// `Debug` prints the party and shape only.
#[derive(Clone, PartialEq, Eq)]
pub struct AShare {
    pub party: Party,
    pub t: RingTensor,
}

impl fmt::Debug for AShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AShare {{ party: {:?}, shape: {:?}, data: <redacted> }}",
            self.party, self.t.shape
        )
    }
}

/// SecureML's local truncation of one share element by `bits`: P0 shifts its share right
/// (logically), P1 shifts the negation of its share and negates back.
#[inline]
pub fn truncate_elem(party: Party, x: u64, bits: u32) -> u64 {
    match party {
        Party::P0 => x >> bits,
        Party::P1 => (x.wrapping_neg() >> bits).wrapping_neg(),
    }
}

impl AShare {
    pub fn new(party: Party, t: RingTensor) -> Self {
        Self { party, t }
    }

    /// The zero sharing: both shares 0.
    pub fn zeros(party: Party, shape: &[usize]) -> Self {
        Self::new(party, RingTensor::zeros(shape))
    }

    /// The trivial sharing of a public (or P0-private) value `v`: P0 holds `v`, P1 holds 0.
    pub fn from_public(party: Party, v: &RingTensor) -> Self {
        match party {
            Party::P0 => Self::new(party, v.clone()),
            Party::P1 => Self::new(party, RingTensor::zeros(&v.shape)),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.t.shape
    }

    pub fn numel(&self) -> usize {
        self.t.numel()
    }

    /// Splits `secret` into two shares: `x0` uniform from `rng` (a CSPRNG), `x1 = x − x0`.
    pub fn share<R: RngCore + ?Sized>(secret: &RingTensor, rng: &mut R) -> (AShare, AShare) {
        let x0 = RingTensor::random(&secret.shape, rng);
        let x1 = secret.sub(&x0).expect("same shape");
        (AShare::new(Party::P0, x0), AShare::new(Party::P1, x1))
    }

    /// `x0 + x1`. The two shares must come from different parties and have one shape.
    pub fn reconstruct(a: &AShare, b: &AShare) -> Result<RingTensor> {
        if a.party == b.party {
            return Err(MpcError::PartyMismatch {
                op: "reconstruct".into(),
            });
        }
        a.t.add(&b.t)
    }

    fn same_party(&self, other: &AShare, op: &str) -> Result<()> {
        if self.party != other.party {
            return Err(MpcError::PartyMismatch { op: op.into() });
        }
        Ok(())
    }

    /// Share of `x + y`.
    pub fn add(&self, other: &AShare) -> Result<AShare> {
        self.same_party(other, "add")?;
        Ok(AShare::new(self.party, self.t.add(&other.t)?))
    }

    /// Share of `x − y`.
    pub fn sub(&self, other: &AShare) -> Result<AShare> {
        self.same_party(other, "sub")?;
        Ok(AShare::new(self.party, self.t.sub(&other.t)?))
    }

    /// Share of `−x`.
    pub fn neg(&self) -> AShare {
        AShare::new(self.party, self.t.neg())
    }

    /// Share of `x + p` for a public `p` of the same shape: P0 adds `p`, P1 keeps its share.
    pub fn add_public(&self, p: &RingTensor) -> Result<AShare> {
        match self.party {
            Party::P0 => Ok(AShare::new(self.party, self.t.add(p)?)),
            Party::P1 => {
                if p.shape != self.t.shape {
                    return Err(MpcError::Shape {
                        op: "add_public".into(),
                        lhs: self.t.shape.clone(),
                        rhs: p.shape.clone(),
                    });
                }
                Ok(self.clone())
            }
        }
    }

    /// Share of `x − p` for a public `p` (P0 subtracts).
    pub fn sub_public(&self, p: &RingTensor) -> Result<AShare> {
        self.add_public(&p.neg())
    }

    /// Share of `x + c` for one public ring constant `c` added to every element (P0 adds).
    pub fn add_const(&self, c: u64) -> AShare {
        match self.party {
            Party::P0 => {
                let mut t = self.t.clone();
                for v in &mut t.data {
                    *v = v.wrapping_add(c);
                }
                AShare::new(self.party, t)
            }
            Party::P1 => self.clone(),
        }
    }

    /// `c − x` for a public constant `c`.
    pub fn rsub_const(&self, c: u64) -> AShare {
        self.neg().add_const(c)
    }

    /// Share of `k·x` for a public integer `k` (no rescaling).
    pub fn mul_public_int(&self, k: i64) -> AShare {
        AShare::new(self.party, self.t.mul_public_int(k))
    }

    /// Share of `x ∘ p` for a public ring tensor `p` of the same shape (no rescaling: if `p` is a
    /// fixed-point encoding the result carries `2f` fractional bits).
    pub fn mul_public(&self, p: &RingTensor) -> Result<AShare> {
        Ok(AShare::new(self.party, self.t.mul_elem(p)?))
    }

    /// Share of `x · W` for a public matrix `W` (no rescaling).
    pub fn matmul_public(&self, w: &RingTensor) -> Result<AShare> {
        Ok(AShare::new(self.party, self.t.matmul(w)?))
    }

    /// The same share under another shape.
    pub fn reshape(self, shape: &[usize]) -> Result<AShare> {
        Ok(AShare::new(self.party, self.t.reshape(shape)?))
    }

    /// SecureML's local probabilistic truncation: a share of `x / 2^bits`, with no
    /// communication.
    ///
    /// P0 replaces `x0` by `x0 >> bits` and P1 replaces `x1` by `−((−x1) >> bits)` (logical
    /// shifts on the u64 share). Let `X` be the secret as a signed integer, `|X| < 2^63`. The
    /// result opens to `⌊X / 2^bits⌋` or `⌊X / 2^bits⌋ + 1` — **at most one unit in the last
    /// place off** — unless the uniform share `x0` falls in a window of `|X|` values next to the
    /// wrap-around, which happens with probability at most `|X| / 2^64`; then the result is off
    /// by about `2^(64−bits)` (garbage). For a product of two fixed-point values with `f`
    /// fractional bits, `X = v·2^(2f)` for the real product `v`, so the failure probability per
    /// element is at most `|v| · 2^(2f−64)`: with `f = 16`, `2^-32·|v|` (about 2.3·10⁻¹⁰ for
    /// |v| = 1, 2.3·10⁻⁸ for |v| = 100). Products that feed a sum are summed before truncating
    /// (same total failure probability, one rounding error instead of one per term). The
    /// engine uses it only where that probability stays small; elsewhere
    /// [`super::protocols::Ctx::truncate_hot`] runs the exact truncation of [`super::trunc`].
    pub fn truncate(&self, bits: u32) -> AShare {
        if bits == 0 {
            return self.clone();
        }
        let party = self.party;
        let data = self
            .t
            .data
            .iter()
            .map(|&x| truncate_elem(party, x, bits))
            .collect();
        AShare::new(
            party,
            RingTensor {
                shape: self.t.shape.clone(),
                data,
            },
        )
    }
}

/// One party's XOR (binary) share of packed words: `w = w0 ⊕ w1`. Used inside comparisons
/// (issue 9): a word holds one 64-bit ring element, or 64/k elements of k bits each, or 64 bits.
///
/// `Debug` prints the party and length only.
#[derive(Clone, PartialEq, Eq)]
pub struct BShare {
    pub party: Party,
    pub words: Vec<u64>,
}

impl fmt::Debug for BShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BShare {{ party: {:?}, words: {}, data: <redacted> }}",
            self.party,
            self.words.len()
        )
    }
}

impl BShare {
    pub fn new(party: Party, words: Vec<u64>) -> Self {
        Self { party, words }
    }

    /// Splits `secret` words into two XOR shares (`w0` uniform from `rng`).
    pub fn share<R: RngCore + ?Sized>(secret: &[u64], rng: &mut R) -> (BShare, BShare) {
        let w0: Vec<u64> = secret.iter().map(|_| rng.next_u64()).collect();
        let w1 = secret.iter().zip(&w0).map(|(s, r)| s ^ r).collect();
        (BShare::new(Party::P0, w0), BShare::new(Party::P1, w1))
    }

    /// `w0 ⊕ w1`.
    pub fn reconstruct(a: &BShare, b: &BShare) -> Result<Vec<u64>> {
        if a.party == b.party {
            return Err(MpcError::PartyMismatch {
                op: "reconstruct (binary)".into(),
            });
        }
        if a.words.len() != b.words.len() {
            return Err(MpcError::Shape {
                op: "reconstruct (binary)".into(),
                lhs: vec![a.words.len()],
                rhs: vec![b.words.len()],
            });
        }
        Ok(a.words.iter().zip(&b.words).map(|(x, y)| x ^ y).collect())
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Share of `x ⊕ y` (local).
    pub fn xor(&self, other: &BShare) -> BShare {
        debug_assert_eq!(self.words.len(), other.words.len());
        BShare::new(
            self.party,
            self.words
                .iter()
                .zip(&other.words)
                .map(|(a, b)| a ^ b)
                .collect(),
        )
    }

    /// Share of `x ⊕ p` for public words `p` (P0 applies it).
    pub fn xor_public(&self, p: &[u64]) -> BShare {
        match self.party {
            Party::P0 => BShare::new(
                self.party,
                self.words.iter().zip(p).map(|(a, b)| a ^ b).collect(),
            ),
            Party::P1 => self.clone(),
        }
    }

    /// Share of `x & p` for public words `p` (both apply it).
    pub fn and_public(&self, p: &[u64]) -> BShare {
        BShare::new(
            self.party,
            self.words.iter().zip(p).map(|(a, b)| a & b).collect(),
        )
    }

    /// Applies a local bit permutation/compression to every word of the share (`f` must be
    /// linear over XOR, e.g. a shift, mask or bit gather).
    pub fn map(&self, f: impl Fn(u64) -> u64) -> BShare {
        BShare::new(self.party, self.words.iter().map(|&w| f(w)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mpc::ring::FixedPoint;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn share_reconstruct_and_local_ops() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let x = RingTensor::from_f64(fp, &[2, 2], &[1.5, -2.0, 3.25, 0.0]).unwrap();
        let y = RingTensor::from_f64(fp, &[2, 2], &[0.5, 4.0, -1.0, 2.0]).unwrap();
        let (x0, x1) = AShare::share(&x, &mut rng);
        let (y0, y1) = AShare::share(&y, &mut rng);
        assert_ne!(x0.t, x, "a share is not the secret");
        assert_eq!(AShare::reconstruct(&x0, &x1).unwrap(), x);
        let open = |a: &AShare, b: &AShare| AShare::reconstruct(a, b).unwrap().to_f64(fp);
        assert_eq!(
            open(&x0.add(&y0).unwrap(), &x1.add(&y1).unwrap()),
            vec![2.0, 2.0, 2.25, 2.0]
        );
        assert_eq!(
            open(&x0.sub(&y0).unwrap(), &x1.sub(&y1).unwrap()),
            vec![1.0, -6.0, 4.25, -2.0]
        );
        assert_eq!(
            open(&x0.add_public(&y).unwrap(), &x1.add_public(&y).unwrap()),
            vec![2.0, 2.0, 2.25, 2.0]
        );
        let c = fp.encode(0.5);
        assert_eq!(
            open(&x0.add_const(c), &x1.add_const(c)),
            vec![2.0, -1.5, 3.75, 0.5]
        );
        assert_eq!(
            open(&x0.rsub_const(c), &x1.rsub_const(c)),
            vec![-1.0, 2.5, -2.75, 0.5]
        );
        assert_eq!(
            open(&x0.mul_public_int(-2), &x1.mul_public_int(-2)),
            vec![-3.0, 4.0, -6.5, 0.0]
        );
        // x ∘ y (public y) carries 2f bits until truncated.
        let p0 = x0.mul_public(&y).unwrap().truncate(16);
        let p1 = x1.mul_public(&y).unwrap().truncate(16);
        for (g, w) in open(&p0, &p1).iter().zip([0.75, -8.0, -3.25, 0.0]) {
            assert!((g - w).abs() <= 1.0 / 65536.0, "within one ulp");
        }
        assert!(x0.add(&x1).is_err(), "shares of different parties");
        assert!(AShare::reconstruct(&x0, &y0).is_err());
        let dbg = format!("{x0:?}");
        assert!(dbg.contains("redacted") && dbg.contains("[2, 2]"));
    }

    #[test]
    fn truncation_is_within_one_ulp() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let n = 20_000;
        // Products of values up to ±300 (X up to 300·2^32 ≈ 2^40: failure p ≤ 2^-24 each).
        let vals: Vec<f64> = (0..n)
            .map(|i| ((i as f64 * 0.7919).sin()) * 300.0)
            .collect();
        let x = RingTensor::new(
            vec![n],
            vals.iter()
                .map(|v| ((v * 2f64.powi(32)).round() as i64) as u64)
                .collect(),
        )
        .unwrap();
        let (x0, x1) = AShare::share(&x, &mut rng);
        let t = AShare::reconstruct(&x0.truncate(16), &x1.truncate(16)).unwrap();
        for (i, &u) in t.data.iter().enumerate() {
            let want = ((x.data[i] as i64) >> 16) as i128;
            let got = (u as i64) as i128;
            assert!(
                got == want || got == want + 1,
                "element {i}: off by more than 1 ulp"
            );
        }
        assert_eq!(x0.truncate(0), x0);
    }
}
