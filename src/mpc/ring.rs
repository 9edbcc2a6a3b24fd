//! The ring Z_2^64 and fixed-point numbers in it.
//!
//! - [`FixedPoint`]: encode a real `v` as `round(v · 2^f)` in two's complement (ties away from
//!   zero), decode by reading the element as a signed integer and dividing by `2^f`.
//! - [`RingTensor`]: a row-major tensor of ring elements with the local ops every layer above
//!   needs (add, sub, neg, multiply by a public integer, elementwise product, matmul), all
//!   wrapping mod 2^64.
//! - [`matmul_u64`]: the hot loop. A cache-blocked, packed, register-tiled wrapping `u64` matmul,
//!   parallel over tiles of the output with rayon; AVX-512 (`vpmullq`) or AVX2 code paths are picked
//!   at run time on x86-64 (see [`matmul_kernel_name`]), portable scalar code otherwise.

use std::fmt;
use std::ops::Range;

use rand_core::RngCore;
use rayon::prelude::*;

use super::{DEFAULT_FRAC_BITS, MpcError, Result};

/// Fixed-point encoding with `frac_bits` fractional bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedPoint {
    frac_bits: u32,
}

impl Default for FixedPoint {
    fn default() -> Self {
        Self {
            frac_bits: DEFAULT_FRAC_BITS,
        }
    }
}

impl FixedPoint {
    /// Largest supported number of fractional bits: a product carries `2f` of them and must keep
    /// room for its integer part and sign in 64 bits.
    pub const MAX_FRAC_BITS: u32 = 30;

    /// `frac_bits` in `0..=MAX_FRAC_BITS`.
    pub fn new(frac_bits: u32) -> Result<Self> {
        if frac_bits > Self::MAX_FRAC_BITS {
            return Err(MpcError::Config(format!(
                "fixed point: {frac_bits} fractional bits requested, at most {} supported",
                Self::MAX_FRAC_BITS
            )));
        }
        Ok(Self { frac_bits })
    }

    /// Number of fractional bits `f`.
    pub fn frac_bits(self) -> u32 {
        self.frac_bits
    }

    /// `2^f` as a float.
    pub fn scale(self) -> f64 {
        (1u64 << self.frac_bits) as f64
    }

    /// The encoding of 1.0, i.e. `2^f` as a ring element.
    pub fn one(self) -> u64 {
        1u64 << self.frac_bits
    }

    /// Largest magnitude that encodes without saturating: `2^(63−f)`.
    pub fn max_abs(self) -> f64 {
        2f64.powi(63 - self.frac_bits as i32)
    }

    /// `round(v · 2^f)` (ties away from zero) as a two's-complement ring element. Values beyond
    /// ±[`max_abs`](Self::max_abs) saturate to the extreme signed values and NaN encodes as 0 —
    /// callers keep values far inside that range anyway, because truncation fails with
    /// probability proportional to the magnitude (see [`super::share::AShare::truncate`]).
    pub fn encode(self, v: f64) -> u64 {
        ((v * self.scale()).round() as i64) as u64
    }

    /// The real value of a ring element: `(x as i64) / 2^f`.
    pub fn decode(self, x: u64) -> f64 {
        (x as i64) as f64 / self.scale()
    }

    /// [`encode`](Self::encode) every element.
    pub fn encode_slice(self, v: &[f64]) -> Vec<u64> {
        v.iter().map(|&x| self.encode(x)).collect()
    }

    /// [`decode`](Self::decode) every element.
    pub fn decode_slice(self, x: &[u64]) -> Vec<f64> {
        x.iter().map(|&u| self.decode(u)).collect()
    }
}

/// A row-major tensor over Z_2^64.
///
/// `Debug` prints the shape only: the data may be a plaintext or a share and must not reach logs.
#[derive(Clone, PartialEq, Eq)]
pub struct RingTensor {
    pub shape: Vec<usize>,
    pub data: Vec<u64>,
}

impl fmt::Debug for RingTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RingTensor {{ shape: {:?}, data: <redacted> }}",
            self.shape
        )
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The output shape of `lhs.matmul(rhs)`, with the rules of [`RingTensor::matmul`].
pub fn matmul_shape(lhs: &[usize], rhs: &[usize]) -> Result<Vec<usize>> {
    let err = || MpcError::Shape {
        op: "matmul".into(),
        lhs: lhs.to_vec(),
        rhs: rhs.to_vec(),
    };
    match (lhs.len(), rhs.len()) {
        (l, 2) if l >= 2 => {
            if lhs[l - 1] != rhs[0] {
                return Err(err());
            }
            let mut out = lhs.to_vec();
            out[l - 1] = rhs[1];
            Ok(out)
        }
        (3, 3) => {
            if lhs[0] != rhs[0] || lhs[2] != rhs[1] {
                return Err(err());
            }
            Ok(vec![lhs[0], lhs[1], rhs[2]])
        }
        _ => Err(err()),
    }
}

impl RingTensor {
    /// A tensor from its shape and row-major data; the lengths must agree.
    pub fn new(shape: Vec<usize>, data: Vec<u64>) -> Result<Self> {
        if numel(&shape) != data.len() {
            return Err(MpcError::Length {
                op: "RingTensor::new".into(),
                shape,
                len: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    /// All zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            data: vec![0; numel(shape)],
        }
    }

    /// Uniformly random elements from `rng` (a CSPRNG wherever the result is a mask or share).
    pub fn random<R: RngCore + ?Sized>(shape: &[usize], rng: &mut R) -> Self {
        let data = (0..numel(shape)).map(|_| rng.next_u64()).collect();
        Self {
            shape: shape.to_vec(),
            data,
        }
    }

    /// Fixed-point encoding of `values` (row-major, `shape`).
    pub fn from_f64(fp: FixedPoint, shape: &[usize], values: &[f64]) -> Result<Self> {
        Self::new(shape.to_vec(), fp.encode_slice(values))
    }

    /// Fixed-point decoding of every element.
    pub fn to_f64(&self, fp: FixedPoint) -> Vec<f64> {
        fp.decode_slice(&self.data)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The same data under another shape with as many elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.data.len() {
            return Err(MpcError::Length {
                op: "reshape".into(),
                shape: shape.to_vec(),
                len: self.data.len(),
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    fn check_same(&self, other: &Self, op: &str) -> Result<()> {
        if self.shape != other.shape {
            return Err(MpcError::Shape {
                op: op.into(),
                lhs: self.shape.clone(),
                rhs: other.shape.clone(),
            });
        }
        Ok(())
    }

    fn zip_with(&self, other: &Self, op: &str, f: impl Fn(u64, u64) -> u64) -> Result<Self> {
        self.check_same(other, op)?;
        Ok(Self {
            shape: self.shape.clone(),
            data: self
                .data
                .iter()
                .zip(&other.data)
                .map(|(&a, &b)| f(a, b))
                .collect(),
        })
    }

    /// `self + other` elementwise (mod 2^64).
    pub fn add(&self, other: &Self) -> Result<Self> {
        self.zip_with(other, "add", u64::wrapping_add)
    }

    /// `self − other` elementwise (mod 2^64).
    pub fn sub(&self, other: &Self) -> Result<Self> {
        self.zip_with(other, "sub", u64::wrapping_sub)
    }

    /// `self ∘ other`, the elementwise product (mod 2^64), without truncation.
    pub fn mul_elem(&self, other: &Self) -> Result<Self> {
        self.zip_with(other, "mul_elem", u64::wrapping_mul)
    }

    /// `self += other` in place.
    pub fn add_assign(&mut self, other: &Self) -> Result<()> {
        self.check_same(other, "add_assign")?;
        for (a, &b) in self.data.iter_mut().zip(&other.data) {
            *a = a.wrapping_add(b);
        }
        Ok(())
    }

    /// `self −= other` in place.
    pub fn sub_assign(&mut self, other: &Self) -> Result<()> {
        self.check_same(other, "sub_assign")?;
        for (a, &b) in self.data.iter_mut().zip(&other.data) {
            *a = a.wrapping_sub(b);
        }
        Ok(())
    }

    /// `−self` (mod 2^64).
    pub fn neg(&self) -> Self {
        Self {
            shape: self.shape.clone(),
            data: self.data.iter().map(|&a| a.wrapping_neg()).collect(),
        }
    }

    /// `k · self` for a public integer `k` (mod 2^64). No truncation: the scale is unchanged.
    pub fn mul_public_int(&self, k: i64) -> Self {
        let k = k as u64;
        Self {
            shape: self.shape.clone(),
            data: self.data.iter().map(|&a| a.wrapping_mul(k)).collect(),
        }
    }

    /// Matrix product (mod 2^64), no truncation.
    ///
    /// Shapes: `[.., m, k] × [k, n] → [.., m, n]` (leading dims of the left operand are flattened
    /// into rows), or batched `[b, m, k] × [b, k, n] → [b, m, n]`.
    pub fn matmul(&self, other: &Self) -> Result<Self> {
        let out_shape = matmul_shape(&self.shape, &other.shape)?;
        let data = if other.shape.len() == 2 {
            let (k, n) = (other.shape[0], other.shape[1]);
            let m = numel(&self.shape[..self.shape.len() - 1]);
            matmul_u64(&self.data, &other.data, m, k, n)
        } else {
            let (b, m, k, n) = (self.shape[0], self.shape[1], self.shape[2], other.shape[2]);
            let mut out = vec![0u64; b * m * n];
            for i in 0..b {
                let c = matmul_u64(
                    &self.data[i * m * k..(i + 1) * m * k],
                    &other.data[i * k * n..(i + 1) * k * n],
                    m,
                    k,
                    n,
                );
                out[i * m * n..(i + 1) * m * n].copy_from_slice(&c);
            }
            out
        };
        Ok(Self {
            shape: out_shape,
            data,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The ring matmul.
// ---------------------------------------------------------------------------------------------

/// Rows of the register tile.
const MR: usize = 4;
/// Columns of the register tile (two 512-bit vectors of u64).
const NR: usize = 16;
/// Depth of a cache block: the `KC × NR` panel of B (16 KiB) stays in L1.
const KC: usize = 128;
/// Rows of an output tile at most (its `MC × KC` block of A, 64 KiB, stays in L2).
const MC_MAX: usize = 64;
/// Columns of an output tile.
const NC: usize = 256;

/// Which kernel [`matmul_u64`] uses on this CPU: `"avx512"`, `"avx2"` or `"scalar"`.
pub fn matmul_kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "scalar"
}

/// `C = A · B` over Z_2^64 (wrapping), `A` `[m, k]`, `B` `[k, n]`, both row-major; returns `C`
/// `[m, n]` row-major.
///
/// A and B are packed once (A into `MR`-row panels, B into `NR`-column panels, zero-padded), then
/// output tiles of at most `MC_MAX × NC` are computed in parallel with rayon, each walking `k` in
/// blocks of `KC` and accumulating `MR × NR` register tiles. Allocation is per call and per tile,
/// never per element.
///
/// # Panics
/// If `a.len() != m·k` or `b.len() != k·n` (a programming error; the message names sizes only).
pub fn matmul_u64(a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Vec<u64> {
    assert_eq!(b.len(), k * n, "matmul_u64: rhs length vs k·n");
    if m == 0 || n == 0 || k == 0 {
        assert_eq!(a.len(), m * k, "matmul_u64: lhs length vs m·k");
        return vec![0u64; m * n];
    }
    matmul_u64_packed(a, &PackedRhs::new(b, k, n), m)
}

/// A right-hand operand `[k, n]` packed once for [`matmul_u64_packed`] (a fixed weight or mask
/// is packed at setup instead of at every product).
#[derive(Clone)]
pub struct PackedRhs {
    pub k: usize,
    pub n: usize,
    data: Vec<u64>,
}

impl PackedRhs {
    /// Packs row-major `b` `[k, n]`.
    pub fn new(b: &[u64], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "PackedRhs: length vs k·n");
        Self {
            k,
            n,
            data: pack_b(b, k, n),
        }
    }
}

/// [`matmul_u64`] with a packed right-hand side: `a` `[m, k]` times `b` `[k, n]`.
pub fn matmul_u64_packed(a: &[u64], b: &PackedRhs, m: usize) -> Vec<u64> {
    let (k, n) = (b.k, b.n);
    assert_eq!(a.len(), m * k, "matmul_u64: lhs length vs m·k");
    let mut c = vec![0u64; m * n];
    if m == 0 || n == 0 || k == 0 {
        return c;
    }
    let packed_a = pack_a(a, m, k);
    let packed_b = &b.data;

    // Row-tile height: at most MC_MAX, smaller when m is small so both cores get work.
    let threads = rayon::current_num_threads().max(1);
    let groups = m.div_ceil(MR);
    let col_tiles = n.div_ceil(NC);
    let want_row_tiles = (2 * threads).div_ceil(col_tiles).max(1);
    let groups_per_tile = groups.div_ceil(want_row_tiles).clamp(1, MC_MAX / MR);
    let row_tiles = groups.div_ceil(groups_per_tile);

    let kernel = select_kernel();
    type Tile = (Range<usize>, Range<usize>, Vec<u64>);
    let tiles: Vec<Tile> = (0..row_tiles * col_tiles)
        .into_par_iter()
        .map(|t| {
            let (rt, ct) = (t / col_tiles, t % col_tiles);
            let g0 = rt * groups_per_tile;
            let g1 = (g0 + groups_per_tile).min(groups);
            let p0 = ct * (NC / NR);
            let p1 = (p0 + NC / NR).min(n.div_ceil(NR));
            let mut tile = vec![0u64; (g1 - g0) * MR * (p1 - p0) * NR];
            kernel(&packed_a, packed_b, k, g0..g1, p0..p1, &mut tile);
            (g0..g1, p0..p1, tile)
        })
        .collect();

    for (gs, ps, tile) in tiles {
        let width = ps.len() * NR;
        let (r0, c0) = (gs.start * MR, ps.start * NR);
        let valid_rows = (gs.len() * MR).min(m - r0);
        let valid_cols = width.min(n - c0);
        for r in 0..valid_rows {
            c[(r0 + r) * n + c0..(r0 + r) * n + c0 + valid_cols]
                .copy_from_slice(&tile[r * width..r * width + valid_cols]);
        }
    }
    c
}

/// A as `ceil(m/MR)` panels, each `k × MR` with `panel[p·MR + r] = A[g·MR + r, p]`.
fn pack_a(a: &[u64], m: usize, k: usize) -> Vec<u64> {
    let groups = m.div_ceil(MR);
    let mut out = vec![0u64; groups * k * MR];
    out.par_chunks_mut(k * MR)
        .enumerate()
        .for_each(|(g, panel)| {
            for r in 0..MR {
                let row = g * MR + r;
                if row >= m {
                    break;
                }
                let src = &a[row * k..(row + 1) * k];
                for (p, &v) in src.iter().enumerate() {
                    panel[p * MR + r] = v;
                }
            }
        });
    out
}

/// B as `ceil(n/NR)` panels, each `k × NR` with `panel[p·NR + j] = B[p, q·NR + j]`.
fn pack_b(b: &[u64], k: usize, n: usize) -> Vec<u64> {
    let panels = n.div_ceil(NR);
    let mut out = vec![0u64; panels * k * NR];
    out.par_chunks_mut(k * NR)
        .enumerate()
        .for_each(|(q, panel)| {
            let j0 = q * NR;
            let w = NR.min(n - j0);
            for p in 0..k {
                panel[p * NR..p * NR + w].copy_from_slice(&b[p * n + j0..p * n + j0 + w]);
            }
        });
    out
}

type TileKernel = fn(&[u64], &[u64], usize, Range<usize>, Range<usize>, &mut [u64]);

fn select_kernel() -> TileKernel {
    #[cfg(target_arch = "x86_64")]
    {
        match matmul_kernel_name() {
            "avx512" => return tile_avx512_entry,
            "avx2" => return tile_avx2_entry,
            _ => {}
        }
    }
    tile_generic
}

#[cfg(target_arch = "x86_64")]
fn tile_avx512_entry(
    pa: &[u64],
    pb: &[u64],
    k: usize,
    groups: Range<usize>,
    panels: Range<usize>,
    tile: &mut [u64],
) {
    // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` confirmed
    // avx512f and avx512dq on this CPU.
    unsafe { tile_avx512(pa, pb, k, groups, panels, tile) }
}

/// The AVX-512 tile with an explicit `MR × NR` register tile: eight `zmm` accumulators
/// (4 rows × 2 vectors of 8 lanes), per step two loads of B, four broadcasts of A and eight
/// `vpmullq` + `vpaddq`, added into the output once per `KC` block. (Left to the compiler, the
/// generic [`micro_kernel`] kept its accumulators on the stack: 1.2 mul-adds per cycle.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn tile_avx512(
    pa: &[u64],
    pb: &[u64],
    k: usize,
    groups: Range<usize>,
    panels: Range<usize>,
    tile: &mut [u64],
) {
    use std::arch::x86_64::*;
    const _: () = assert!(MR == 4 && NR == 16);
    let width = panels.len() * NR;
    assert!(tile.len() >= groups.len() * MR * width, "tile size");
    let mut pc = 0;
    while pc < k {
        let kc = KC.min(k - pc);
        for (qi, q) in panels.clone().enumerate() {
            let bp = &pb[q * k * NR + pc * NR..q * k * NR + (pc + kc) * NR];
            for (gi, g) in groups.clone().enumerate() {
                let ap = &pa[g * k * MR + pc * MR..g * k * MR + (pc + kc) * MR];
                let z = _mm512_setzero_si512();
                let (mut c00, mut c01, mut c10, mut c11) = (z, z, z, z);
                let (mut c20, mut c21, mut c30, mut c31) = (z, z, z, z);
                let (a_ptr, b_ptr) = (ap.as_ptr() as *const i64, bp.as_ptr() as *const i64);
                for p in 0..kc {
                    // SAFETY: `bp` holds `kc·NR` and `ap` `kc·MR` words (sliced above), so
                    // every offset read here is in bounds.
                    let (b0, b1, a) = unsafe {
                        (
                            _mm512_loadu_epi64(b_ptr.add(p * NR)),
                            _mm512_loadu_epi64(b_ptr.add(p * NR + 8)),
                            [
                                *a_ptr.add(p * MR),
                                *a_ptr.add(p * MR + 1),
                                *a_ptr.add(p * MR + 2),
                                *a_ptr.add(p * MR + 3),
                            ],
                        )
                    };
                    let a0 = _mm512_set1_epi64(a[0]);
                    c00 = _mm512_add_epi64(c00, _mm512_mullo_epi64(a0, b0));
                    c01 = _mm512_add_epi64(c01, _mm512_mullo_epi64(a0, b1));
                    let a1 = _mm512_set1_epi64(a[1]);
                    c10 = _mm512_add_epi64(c10, _mm512_mullo_epi64(a1, b0));
                    c11 = _mm512_add_epi64(c11, _mm512_mullo_epi64(a1, b1));
                    let a2 = _mm512_set1_epi64(a[2]);
                    c20 = _mm512_add_epi64(c20, _mm512_mullo_epi64(a2, b0));
                    c21 = _mm512_add_epi64(c21, _mm512_mullo_epi64(a2, b1));
                    let a3 = _mm512_set1_epi64(a[3]);
                    c30 = _mm512_add_epi64(c30, _mm512_mullo_epi64(a3, b0));
                    c31 = _mm512_add_epi64(c31, _mm512_mullo_epi64(a3, b1));
                }
                for (r, (lo, hi)) in [(c00, c01), (c10, c11), (c20, c21), (c30, c31)]
                    .into_iter()
                    .enumerate()
                {
                    let off = (gi * MR + r) * width + qi * NR;
                    let dst = &mut tile[off..off + NR];
                    let d = dst.as_mut_ptr() as *mut i64;
                    // SAFETY: `dst` is NR = 16 words long (sliced, bounds-checked above).
                    unsafe {
                        _mm512_storeu_epi64(d, _mm512_add_epi64(_mm512_loadu_epi64(d), lo));
                        _mm512_storeu_epi64(
                            d.add(8),
                            _mm512_add_epi64(_mm512_loadu_epi64(d.add(8)), hi),
                        );
                    }
                }
            }
        }
        pc += kc;
    }
}

#[cfg(target_arch = "x86_64")]
fn tile_avx2_entry(
    pa: &[u64],
    pb: &[u64],
    k: usize,
    groups: Range<usize>,
    panels: Range<usize>,
    tile: &mut [u64],
) {
    // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!("avx2")`.
    unsafe { tile_avx2(pa, pb, k, groups, panels, tile) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn tile_avx2(
    pa: &[u64],
    pb: &[u64],
    k: usize,
    groups: Range<usize>,
    panels: Range<usize>,
    tile: &mut [u64],
) {
    tile_body(pa, pb, k, groups, panels, tile)
}

fn tile_generic(
    pa: &[u64],
    pb: &[u64],
    k: usize,
    groups: Range<usize>,
    panels: Range<usize>,
    tile: &mut [u64],
) {
    tile_body(pa, pb, k, groups, panels, tile)
}

/// One output tile: rows `groups × MR`, columns `panels × NR`, row-major in `tile` with width
/// `panels.len() · NR`. Inlined into each `target_feature` wrapper so that the compiler
/// vectorises the register tile for that instruction set.
#[inline(always)]
fn tile_body(
    pa: &[u64],
    pb: &[u64],
    k: usize,
    groups: Range<usize>,
    panels: Range<usize>,
    tile: &mut [u64],
) {
    let width = panels.len() * NR;
    let mut pc = 0;
    while pc < k {
        let kc = KC.min(k - pc);
        for (qi, q) in panels.clone().enumerate() {
            let bp = &pb[q * k * NR + pc * NR..q * k * NR + (pc + kc) * NR];
            for (gi, g) in groups.clone().enumerate() {
                let ap = &pa[g * k * MR + pc * MR..g * k * MR + (pc + kc) * MR];
                let acc = micro_kernel(ap, bp);
                for (r, acc_row) in acc.iter().enumerate() {
                    let off = (gi * MR + r) * width + qi * NR;
                    let dst = &mut tile[off..off + NR];
                    for (d, &s) in dst.iter_mut().zip(acc_row) {
                        *d = d.wrapping_add(s);
                    }
                }
            }
        }
        pc += kc;
    }
}

/// `MR × NR` register tile: `acc[r][j] = Σ_p a[p·MR + r] · b[p·NR + j]` (wrapping).
#[inline(always)]
fn micro_kernel(a: &[u64], b: &[u64]) -> [[u64; NR]; MR] {
    let mut acc = [[0u64; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        let ap: &[u64; MR] = ap.try_into().expect("chunk of MR");
        let bp: &[u64; NR] = bp.try_into().expect("chunk of NR");
        for r in 0..MR {
            let ar = ap[r];
            for j in 0..NR {
                acc[r][j] = acc[r][j].wrapping_add(ar.wrapping_mul(bp[j]));
            }
        }
    }
    acc
}

/// The plain triple loop, for tests.
pub fn matmul_u64_naive(a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Vec<u64> {
    let mut c = vec![0u64; m * n];
    for i in 0..m {
        for p in 0..k {
            let aip = a[i * k + p];
            for j in 0..n {
                c[i * n + j] = c[i * n + j].wrapping_add(aip.wrapping_mul(b[p * n + j]));
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha12Rng;
    use rand_core::SeedableRng;

    fn rng(seed: u64) -> ChaCha12Rng {
        ChaCha12Rng::seed_from_u64(seed)
    }

    #[test]
    fn encode_decode_round_trip() {
        let fp = FixedPoint::default();
        assert_eq!(fp.frac_bits(), 16);
        for &v in &[0.0, 1.0, -1.0, 0.5, -0.5, 3.25, -1234.0625, 1e-6, -7e4] {
            let d = fp.decode(fp.encode(v));
            assert!(
                (d - v).abs() <= 0.5 / fp.scale(),
                "round trip of a test constant"
            );
        }
        assert_eq!(fp.encode(-1.0), (-(1i64 << 16)) as u64, "two's complement");
        assert_eq!(fp.encode(1.5 / 65536.0), 2, "ties away from zero");
        assert_eq!(fp.encode(-1.5 / 65536.0), (-2i64) as u64);
        assert_eq!(fp.encode(0.4 / 65536.0), 0);
        assert_eq!(fp.encode(f64::NAN), 0);
        assert_eq!(fp.encode(1e300), i64::MAX as u64, "saturates");
        let fp8 = FixedPoint::new(8).unwrap();
        assert_eq!(fp8.encode(1.0), 256);
        assert!(FixedPoint::new(31).is_err());
    }

    #[test]
    fn local_ops_wrap() {
        let fp = FixedPoint::default();
        let x = RingTensor::from_f64(fp, &[2, 2], &[1.0, -2.0, 3.5, -0.25]).unwrap();
        let y = RingTensor::from_f64(fp, &[2, 2], &[-4.0, 0.5, 1.0, 2.0]).unwrap();
        assert_eq!(x.add(&y).unwrap().to_f64(fp), vec![-3.0, -1.5, 4.5, 1.75]);
        assert_eq!(x.sub(&y).unwrap().to_f64(fp), vec![5.0, -2.5, 2.5, -2.25]);
        assert_eq!(x.neg().to_f64(fp), vec![-1.0, 2.0, -3.5, 0.25]);
        assert_eq!(
            x.mul_public_int(-3).to_f64(fp),
            vec![-3.0, 6.0, -10.5, 0.75]
        );
        let mut z = x.clone();
        z.add_assign(&y).unwrap();
        z.sub_assign(&y).unwrap();
        assert_eq!(z, x);
        let w = RingTensor::new(vec![usize::MAX], vec![u64::MAX; 1]);
        assert!(w.is_err(), "shape [MAX] with one element");
        let big = RingTensor::new(vec![1], vec![u64::MAX]).unwrap();
        let one = RingTensor::new(vec![1], vec![1]).unwrap();
        assert_eq!(big.add(&one).unwrap().data, vec![0]);
        assert!(x.add(&big).is_err());
        // Debug never shows data.
        let dbg = format!("{x:?}");
        assert!(dbg.contains("redacted") && !dbg.contains("65536"));
    }

    #[test]
    fn matmul_matches_naive_loop() {
        let mut r = rng(7);
        // Shapes around every blocking edge: MR, NR, KC, MC_MAX, NC and 1.
        let shapes = [
            (1, 1, 1),
            (1, 7, 1),
            (3, 5, 2),
            (4, 16, 16),
            (5, 17, 33),
            (13, 129, 31),
            (64, 128, 256),
            (65, 257, 257),
            (130, 300, 20),
            (2, 700, 513),
        ];
        for &(m, k, n) in &shapes {
            let a: Vec<u64> = (0..m * k).map(|_| r.next_u64()).collect();
            let b: Vec<u64> = (0..k * n).map(|_| r.next_u64()).collect();
            assert_eq!(
                matmul_u64(&a, &b, m, k, n),
                matmul_u64_naive(&a, &b, m, k, n),
                "shape ({m},{k},{n})"
            );
        }
        assert!(matmul_u64(&[], &[], 0, 3, 0).is_empty());
        assert_eq!(matmul_u64(&[], &[], 2, 0, 3), vec![0; 6]);
    }

    #[test]
    fn tensor_matmul_shapes() {
        let mut r = rng(8);
        let a = RingTensor::random(&[2, 3, 5], &mut r);
        let w = RingTensor::random(&[5, 4], &mut r);
        let c = a.matmul(&w).unwrap();
        assert_eq!(c.shape, vec![2, 3, 4]);
        assert_eq!(c.data, matmul_u64_naive(&a.data, &w.data, 6, 5, 4));
        let b = RingTensor::random(&[2, 5, 4], &mut r);
        let d = a.matmul(&b).unwrap();
        assert_eq!(d.shape, vec![2, 3, 4]);
        assert_eq!(
            d.data[12..],
            matmul_u64_naive(&a.data[15..], &b.data[20..], 3, 5, 4)[..]
        );
        assert!(a.matmul(&RingTensor::zeros(&[4, 4])).is_err());
        assert!(a.matmul(&RingTensor::zeros(&[3, 5, 4])).is_err());
    }

    #[test]
    fn fixed_point_matmul_decodes() {
        // Encoded product carries 2f fractional bits; an arithmetic shift brings it back.
        let fp = FixedPoint::default();
        let a = RingTensor::from_f64(fp, &[2, 2], &[1.5, -2.0, 0.25, 4.0]).unwrap();
        let b = RingTensor::from_f64(fp, &[2, 1], &[2.0, -0.5]).unwrap();
        let c = a.matmul(&b).unwrap();
        let dec: Vec<f64> = c
            .data
            .iter()
            .map(|&x| fp.decode(((x as i64) >> 16) as u64))
            .collect();
        assert_eq!(dec, vec![4.0, -1.5]);
    }

    /// Throughput of the ring matmul; run with
    /// `cargo test --release --lib mpc::ring -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn matmul_throughput() {
        let mut r = rng(9);
        for &(m, k, n) in &[
            (768, 768, 128),
            (128, 768, 768),
            (128, 768, 3072),
            (128, 3072, 768),
        ] {
            let a: Vec<u64> = (0..m * k).map(|_| r.next_u64()).collect();
            let b: Vec<u64> = (0..k * n).map(|_| r.next_u64()).collect();
            let _ = matmul_u64(&a, &b, m, k, n);
            let reps = 5;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(matmul_u64(&a, &b, m, k, n));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "ring matmul [{m}x{k}]·[{k}x{n}] kernel={} threads={}: {:.2} ms, {:.2} G mul-add/s",
                matmul_kernel_name(),
                rayon::current_num_threads(),
                s * 1e3,
                (m * k * n) as f64 / s / 1e9
            );
        }
    }
}
