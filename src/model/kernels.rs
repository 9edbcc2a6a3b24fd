//! Fused CPU kernels for the Flex backend, forward and backward.
//!
//! Burn runs the elementwise parts of the encoder — Quad, GeLU, 2Quad, the masked softmax and,
//! under autodiff, LayerNorm — as chains of separate ops, most of them on one core, and keeps an
//! intermediate tensor per op for the backward pass (BENCHMARKS.md, "Performance work"). Here each
//! is one parallel pass over memory with a hand-written autodiff node, so a distillation step
//! spends its time in the matmuls.
//!
//! The kernels run only for f32 tensors on Flex, plain or tracked by autodiff (without gradient
//! checkpointing). Every entry point returns `Err(inputs)` otherwise — on wgpu, say — and the
//! caller runs its composite Burn formulation, which stays the definition: the tests in
//! `tests/kernels.rs` hold the two to each other, values and gradients. `MPCFORMER_KERNELS=0`
//! switches the kernels off (A/B timing, debugging).

use std::sync::OnceLock;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, BackendTensor, DispatchAutodiffContext, DispatchTensorKind, Flex,
    GradientCheckpointingStrategy,
};
use burn::tensor::{Bytes, DType, Shape, Tensor};
use rayon::prelude::*;

use super::approx::{MASK_NEG, QUAD_A, QUAD_B, QUAD_C};
use super::dropout::MaskStream;

type AdTensor = FloatTensor<Autodiff<Flex>>;

/// Whether the kernels are on (`MPCFORMER_KERNELS=0` turns them off).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("MPCFORMER_KERNELS").map_or(true, |v| v != "0"))
}

// ---------------------------------------------------------------------------------------------
// Primitives: Tensor ↔ Flex tensor, plain or autodiff.

/// A float tensor's Flex primitive.
enum Prim {
    Plain(FlexTensor),
    Ad(AdTensor),
}

impl Prim {
    fn flex(&self) -> FlexTensor {
        match self {
            Prim::Plain(t) => t.clone(),
            Prim::Ad(t) => t.primitive().clone(),
        }
    }

    fn into_ad(self) -> AdTensor {
        match self {
            Prim::Plain(t) => AdTensor::new(t),
            Prim::Ad(t) => t,
        }
    }
}

fn is_flex_f32<const D: usize>(t: &Tensor<D>) -> bool {
    let d = t.clone().into_dispatch();
    match (&d.kind, d.autodiff) {
        (DispatchTensorKind::Flex(BackendTensor::Float(x)), DispatchAutodiffContext::Disabled) => {
            x.dtype() == DType::F32
        }
        (
            DispatchTensorKind::Autodiff(inner),
            DispatchAutodiffContext::Enabled(GradientCheckpointingStrategy::Disabled),
        ) => matches!(&**inner,
            DispatchTensorKind::Flex(BackendTensor::Autodiff(x)) if x.primitive().dtype() == DType::F32),
        _ => false,
    }
}

/// Call only after [`is_flex_f32`] said yes.
fn prim<const D: usize>(t: Tensor<D>) -> Prim {
    match t.into_dispatch().kind {
        DispatchTensorKind::Flex(BackendTensor::Float(x)) => Prim::Plain(x),
        DispatchTensorKind::Autodiff(inner) => match *inner {
            DispatchTensorKind::Flex(BackendTensor::Autodiff(x)) => Prim::Ad(x),
            _ => unreachable!("checked by is_flex_f32"),
        },
        _ => unreachable!("checked by is_flex_f32"),
    }
}

fn plain<const D: usize>(t: FlexTensor) -> Tensor<D> {
    Tensor::from_primitive::<Flex>(t)
}

fn tracked<const D: usize>(t: AdTensor) -> Tensor<D> {
    Tensor::from_primitive::<Autodiff<Flex>>(t)
}

fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn data(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("contiguous f32 (made so by `contiguous`)")
}

fn flex(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

fn shape(t: &FlexTensor) -> Shape {
    t.layout().shape().clone()
}

// ---------------------------------------------------------------------------------------------
// SIMD: the loops below are written to auto-vectorise; on x86-64 they are compiled a second time
// for AVX2 + FMA and picked at run time (the crate itself targets baseline x86-64).

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static YES: OnceLock<bool> = OnceLock::new();
        *YES.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Defines `$name(args)` that runs `$body` compiled for AVX2 + FMA when the CPU has them.
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident$(<$g:ident: $b:path>)?($($a:ident: $t:ty),*) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        fn $name$(<$g: $b>)?($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn imp$(<$g: $b>)?($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2$(<$g: $b>)?($($a: $t),*) $(-> $r)? { imp$(::<$g>)?($($a),*) }
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU has AVX2 and FMA (checked at run time).
                return unsafe { avx2$(::<$g>)?($($a),*) };
            }
            imp$(::<$g>)?($($a),*)
        }
    };
}

/// `eˣ`, branch-free (Cephes' polynomial; ≤ 2 ulp on [−87, 88]); exactly 0 below −87.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to the nearest integer without a rounding instruction.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    // 2ⁿ from n's bits in t's mantissa: integer ops only, so the loop vectorises (an `as i32`
    // cast saturates and does not).
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < -87.0 { 0.0 } else { p * scale }
}

/// `erf(x)`, Abramowitz–Stegun 7.1.26 (absolute error ≤ 1.5·10⁻⁷, as PyTorch's vectorised erf).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp(-a * a)).copysign(x)
}

// ---------------------------------------------------------------------------------------------
// Elementwise activations.

/// An elementwise function with its derivative.
pub trait Elementwise: Send + Sync + 'static {
    fn f(x: f32) -> f32;
    fn df(x: f32) -> f32;
}

/// MPCFormer's Quad, `0.125x² + 0.25x + 0.5` (same Horner form as [`super::approx::Act`]).
#[derive(Debug)]
pub struct Quad;

impl Elementwise for Quad {
    #[inline(always)]
    fn f(x: f32) -> f32 {
        (x * QUAD_A as f32 + QUAD_B as f32) * x + QUAD_C as f32
    }
    #[inline(always)]
    fn df(x: f32) -> f32 {
        x * (2.0 * QUAD_A) as f32 + QUAD_B as f32
    }
}

/// Exact GeLU, `x·Φ(x)`.
#[derive(Debug)]
pub struct Gelu;

impl Elementwise for Gelu {
    #[inline(always)]
    fn f(x: f32) -> f32 {
        0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
    }
    #[inline(always)]
    fn df(x: f32) -> f32 {
        const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
        0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
            + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x)
    }
}

const CHUNK: usize = 1 << 14;

simd_fn! {
    fn map_chunk<E: Elementwise>(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = E::f(x);
        }
    }
}

simd_fn! {
    fn map_in_place<E: Elementwise>(x: &mut [f32]) {
        for x in x.iter_mut() {
            *x = E::f(*x);
        }
    }
}

simd_fn! {
    fn grad_chunk<E: Elementwise>(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            *dx = dy * E::df(x);
        }
    }
}

fn forward_map<E: Elementwise>(x: &FlexTensor) -> FlexTensor {
    let xs = data(x);
    let mut y = vec![0f32; xs.len()];
    y.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .for_each(|(y, x)| map_chunk::<E>(x, y));
    flex(y, shape(x))
}

#[derive(Debug)]
struct ElementwiseBackward<E>(std::marker::PhantomData<E>);

impl<E: Elementwise + std::fmt::Debug> Backward<Flex, 1> for ElementwiseBackward<E> {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let Some(parent) = parent else { return };
        let (x, dys) = (data(&ops.state), data(&dy));
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dys.par_chunks(CHUNK)))
            .for_each(|(dx, (x, dy))| grad_chunk::<E>(x, dy, dx));
        grads.register::<Flex>(parent.id, flex(dx, shape(&ops.state)));
    }
}

/// `E::f(x)` elementwise in one parallel pass.
#[allow(clippy::result_large_err)]
pub fn elementwise<E: Elementwise + std::fmt::Debug, const D: usize>(
    x: Tensor<D>,
) -> Result<Tensor<D>, Tensor<D>> {
    if !enabled() || !is_flex_f32(&x) {
        return Err(x);
    }
    match prim(x) {
        Prim::Plain(x) => {
            let mut x = contiguous(x);
            // Inference: overwrite the input when nothing else holds it.
            if let Some(xs) = x.try_storage_mut::<f32>() {
                xs.par_chunks_mut(CHUNK).for_each(map_in_place::<E>);
                return Ok(plain(x));
            }
            Ok(plain(forward_map::<E>(&x)))
        }
        Prim::Ad(x) => {
            let node = ElementwiseBackward::<E>(std::marker::PhantomData);
            let input = contiguous(x.primitive().clone());
            let y = forward_map::<E>(&input);
            Ok(tracked(
                match <_ as Backward<Flex, 1>>::prepare::<NoCheckpointing>(node, [x.node()])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => prep.finish(input, y),
                    OpsKind::UnTracked(prep) => prep.finish(y),
                },
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout: the mask is applied as it is drawn, and kept as one byte per element for the backward
// pass (a quarter of an f32 mask; drawing it again costs more than reading it).

/// `y = x·m` over CHUNK-aligned chunks (the mask's elements are numbered from 0); `kept[i]` = 1
/// where `m[i]` ≠ 0.
fn apply_mask(stream: MaskStream, x: &[f32]) -> (Vec<f32>, Vec<u8>) {
    let (mut y, mut kept) = (vec![0f32; x.len()], vec![0u8; x.len()]);
    y.par_chunks_mut(CHUNK)
        .zip(kept.par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, ((y, kept), x))| {
            stream.for_each(c * CHUNK, x.len(), |k, m| {
                y[k] = x[k] * m;
                kept[k] = (m != 0.0) as u8;
            })
        });
    (y, kept)
}

simd_fn! {
    fn masked_chunk(dy: &[f32], kept: &[u8], scale: f32, dx: &mut [f32]) {
        for ((dx, &dy), &k) in dx.iter_mut().zip(dy).zip(kept) {
            *dx = dy * (k as f32 * scale);
        }
    }
}

#[derive(Debug)]
struct DropoutBackward;

impl Backward<Flex, 1> for DropoutBackward {
    type State = (std::sync::Arc<Vec<u8>>, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let Some(parent) = parent else { return };
        let ((kept, scale), dys) = (ops.state, data(&dy));
        let mut dx = vec![0f32; dys.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(dys.par_chunks(CHUNK).zip(kept.par_chunks(CHUNK)))
            .for_each(|(dx, (dy, k))| masked_chunk(dy, k, scale, dx));
        grads.register::<Flex>(parent.id, flex(dx, shape(&dy)));
    }
}

/// `x·m` for the dropout mask `m` of `stream`, on an autodiff Flex tensor, in one parallel pass.
#[allow(clippy::result_large_err)]
pub fn dropout<const D: usize>(x: Tensor<D>, stream: MaskStream) -> Result<Tensor<D>, Tensor<D>> {
    if !enabled() || !is_flex_f32(&x) {
        return Err(x);
    }
    let x = match prim(x) {
        Prim::Ad(x) => x,
        Prim::Plain(x) => return Err(plain(x)),
    };
    let xs = contiguous(x.primitive().clone());
    let (y, kept) = apply_mask(stream, data(&xs));
    let y = flex(y, shape(&xs));
    Ok(tracked(
        match <_ as Backward<Flex, 1>>::prepare::<NoCheckpointing>(DropoutBackward, [x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((std::sync::Arc::new(kept), stream.scale()), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// Attention normalisers over the last axis of [B, H, Lq, Lk] scores with a [B, Lk] 0/1 key mask.

/// Which normaliser, with its constant.
#[derive(Clone, Copy, Debug)]
pub enum Normaliser {
    /// `softmax(s + (1 − m)·MASK_NEG)` (HF BERT's additive mask).
    Softmax,
    /// `(s + c)²·m / Σ (s + c)²·m`.
    TwoQuad(f32),
}

/// Rows of scores per parallel task.
const ROWS: usize = 32;

/// `Σ f(a_i, b_i)` in 8 lanes over exact chunks of 8, then the tail: the form that vectorises
/// (a float sum is not reassociated otherwise).
#[inline(always)]
fn sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (ac, bc) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    let mut lanes = [0f32; 8];
    for (x, y) in ac.zip(bc) {
        let (x, y): (&[f32; 8], &[f32; 8]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for j in 0..8 {
            lanes[j] += f(x[j], y[j]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sum1(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum2(a, a, |x, _| f(x))
}

#[inline(always)]
fn max1(a: &[f32]) -> f32 {
    let c = a.chunks_exact(8);
    let tail = c
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut lanes = [f32::NEG_INFINITY; 8];
    for x in c {
        let x: &[f32; 8] = x.try_into().unwrap();
        for j in 0..8 {
            lanes[j] = if x[j] > lanes[j] { x[j] } else { lanes[j] };
        }
    }
    lanes.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

simd_fn! {
    /// In place: `p` holds the scores on entry.
    fn softmax_row(m: &[f32], p: &mut [f32]) {
        for (p, &m) in p.iter_mut().zip(m) {
            *p += (1.0 - m) * MASK_NEG as f32;
        }
        let max = max1(p);
        for p in p.iter_mut() {
            *p = exp(*p - max);
        }
        let inv = 1.0 / sum1(p, |v| v);
        for p in p.iter_mut() {
            *p *= inv;
        }
    }
}

simd_fn! {
    /// In place: `p` holds the scores on entry.
    fn two_quad_row(m: &[f32], c: f32, p: &mut [f32]) {
        for (p, &m) in p.iter_mut().zip(m) {
            *p = (*p + c) * (*p + c) * m;
        }
        let inv = 1.0 / sum1(p, |v| v);
        for p in p.iter_mut() {
            *p *= inv;
        }
    }
}

simd_fn! {
    /// softmax: `ds = p·(dp − ⟨dp, p⟩)`.
    fn softmax_grad_row(p: &[f32], dp: &[f32], ds: &mut [f32]) {
        let g = sum2(dp, p, |a, b| a * b);
        for ((ds, &p), &dp) in ds.iter_mut().zip(p).zip(dp) {
            *ds = p * (dp - g);
        }
    }
}

simd_fn! {
    /// 2Quad, from the scores: `ds_j = 2(s_j + c)·m_j·(dp_j − ⟨dp, p⟩)/z`, `p = e/z`.
    fn two_quad_grad_row(s: &[f32], m: &[f32], c: f32, dp: &[f32], ds: &mut [f32]) {
        for ((e, &s), &m) in ds.iter_mut().zip(s).zip(m) {
            *e = (s + c) * (s + c) * m;
        }
        let inv_z = 1.0 / sum1(ds, |e| e);
        let g = sum2(ds, dp, |e, d| e * d) * inv_z;
        for (((ds, &s), &m), &dp) in ds.iter_mut().zip(s).zip(m).zip(dp) {
            *ds = 2.0 * (s + c) * m * (dp - g) * inv_z;
        }
    }
}

/// Runs `row(a_row, b_row, mask_row, out_row)` over every row of [B, H, Lq, Lk], in parallel.
fn over_rows(
    dims: [usize; 4],
    (a, b): (&[f32], &[f32]),
    mask: &[f32],
    out: &mut [f32],
    row: impl Fn(&[f32], &[f32], &[f32], &mut [f32]) + Sync,
) {
    let [_, h, lq, lk] = dims;
    out.par_chunks_mut(ROWS * lk)
        .enumerate()
        .for_each(|(chunk, out)| {
            for (i, out) in out.chunks_mut(lk).enumerate() {
                let r = chunk * ROWS + i;
                let (span, batch) = (r * lk..(r + 1) * lk, r / (h * lq));
                row(
                    &a[span.clone()],
                    &b[span],
                    &mask[batch * lk..(batch + 1) * lk],
                    out,
                );
            }
        });
}

#[derive(Debug)]
struct NormaliserBackward(Normaliser);

#[derive(Clone, Debug)]
struct NormaliserState {
    /// Softmax: the output `p`; 2Quad: the scores `s`.
    saved: FlexTensor,
    mask: FlexTensor,
}

impl Backward<Flex, 1> for NormaliserBackward {
    type State = NormaliserState;

    fn backward(self, ops: Ops<NormaliserState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let dp = contiguous(grads.consume::<Flex>(&ops.node));
        let Some(parent) = parent else { return };
        let NormaliserState { saved, mask } = ops.state;
        let dims: [usize; 4] = shape(&saved).dims();
        let mut ds = vec![0f32; data(&saved).len()];
        let inputs = (data(&saved), data(&dp));
        match self.0 {
            Normaliser::Softmax => over_rows(dims, inputs, data(&mask), &mut ds, |p, dp, _, ds| {
                softmax_grad_row(p, dp, ds)
            }),
            Normaliser::TwoQuad(c) => {
                over_rows(dims, inputs, data(&mask), &mut ds, |s, dp, m, ds| {
                    two_quad_grad_row(s, m, c, dp, ds)
                })
            }
        }
        grads.register::<Flex>(parent.id, flex(ds, shape(&saved)));
    }
}

/// Normalises every row of `p` ([B, H, Lq, Lk] scores on entry) in place, in parallel.
fn normalise_rows(kind: Normaliser, dims: [usize; 4], mask: &[f32], p: &mut [f32]) {
    let [_, h, lq, lk] = dims;
    p.par_chunks_mut(ROWS * lk)
        .enumerate()
        .for_each(|(chunk, rows)| {
            for (i, row) in rows.chunks_mut(lk).enumerate() {
                let b = (chunk * ROWS + i) / (h * lq);
                let m = &mask[b * lk..(b + 1) * lk];
                match kind {
                    Normaliser::Softmax => softmax_row(m, row),
                    Normaliser::TwoQuad(c) => two_quad_row(m, c, row),
                }
            }
        });
}

/// Attention weights from scores [B, H, Lq, Lk] and the 0/1 key mask [B, Lk], one parallel pass.
#[allow(clippy::result_large_err)]
pub fn normalise(
    kind: Normaliser,
    scores: Tensor<4>,
    key_mask: Tensor<2>,
) -> Result<Tensor<4>, (Tensor<4>, Tensor<2>)> {
    if !enabled() || !is_flex_f32(&scores) || !is_flex_f32(&key_mask) {
        return Err((scores, key_mask));
    }
    let mask = contiguous(prim(key_mask).flex());
    let x = match prim(scores) {
        Prim::Plain(s) => {
            // Inference: overwrite the scores when nothing else holds them.
            let mut s = contiguous(s);
            let dims: [usize; 4] = shape(&s).dims();
            match s.try_storage_mut::<f32>() {
                Some(p) => normalise_rows(kind, dims, data(&mask), p),
                None => {
                    let mut p = data(&s).to_vec();
                    normalise_rows(kind, dims, data(&mask), &mut p);
                    s = flex(p, shape(&s));
                }
            }
            return Ok(plain(s));
        }
        Prim::Ad(x) => x,
    };
    let s = contiguous(x.primitive().clone());
    let dims: [usize; 4] = shape(&s).dims();
    let mut p = data(&s).to_vec();
    normalise_rows(kind, dims, data(&mask), &mut p);
    let p = flex(p, shape(&s));
    Ok(tracked(
        match <_ as Backward<Flex, 1>>::prepare::<NoCheckpointing>(
            NormaliserBackward(kind),
            [x.node()],
        )
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(prep) => {
                let saved = match kind {
                    Normaliser::Softmax => p.clone(),
                    Normaliser::TwoQuad(_) => s,
                };
                prep.finish(NormaliserState { saved, mask }, p)
            }
            OpsKind::UnTracked(prep) => prep.finish(p),
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last axis, optionally of `x + residual` (the encoder's every use).

simd_fn! {
    /// One row, in place: `y` holds x on entry and `(x [+ r] − μ)·rstd·γ + β` on return; `xhat`,
    /// when asked, gets `(x [+ r] − μ)·rstd`. Returns rstd.
    fn layer_norm_row(y: &mut [f32], r: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32,
                      xhat: Option<&mut [f32]>) -> f32 {
        if let Some(r) = r {
            for (y, &r) in y.iter_mut().zip(r) {
                *y += r;
            }
        }
        let n = y.len() as f32;
        let mean = sum1(y, |v| v) / n;
        let rstd = 1.0 / (sum1(y, |v| (v - mean) * (v - mean)) / n + eps).sqrt();
        match xhat {
            Some(xhat) => for (((h, y), &g), &b) in xhat.iter_mut().zip(y.iter_mut()).zip(gamma).zip(beta) {
                *h = (*y - mean) * rstd;
                *y = *h * g + b;
            },
            None => for ((y, &g), &b) in y.iter_mut().zip(gamma).zip(beta) {
                *y = (*y - mean) * rstd * g + b;
            },
        }
        rstd
    }
}

simd_fn! {
    /// One row of the input gradient; accumulates `dy·x̂` and `dy` into `dg`, `db`.
    fn layer_norm_grad_row(xhat: &[f32], dy: &[f32], gamma: &[f32], rstd: f32,
                           dx: &mut [f32], dg: &mut [f32], db: &mut [f32]) {
        let n = xhat.len() as f32;
        for ((dh, &d), &g) in dx.iter_mut().zip(dy).zip(gamma) {
            *dh = d * g;
        }
        let m1 = sum1(dx, |v| v) / n;
        let m2 = sum2(dx, xhat, |a, b| a * b) / n;
        for (((dx, &h), &d), (dg, db)) in
            dx.iter_mut().zip(xhat).zip(dy).zip(dg.iter_mut().zip(db.iter_mut()))
        {
            *dx = rstd * (*dx - m1 - h * m2);
            *dg += d * h;
            *db += d;
        }
    }
}

#[derive(Debug)]
struct LayerNormBackward;

#[derive(Clone, Debug)]
struct LayerNormState {
    xhat: FlexTensor,
    rstd: std::sync::Arc<Vec<f32>>,
    gamma: FlexTensor,
}

/// Parents: `[x, γ, β, residual]`; the residual gets the same gradient as `x`.
impl Backward<Flex, 4> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<LayerNormState, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pg, pb, pr] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let LayerNormState { xhat, rstd, gamma } = ops.state;
        let (h, dys, g) = (data(&xhat), data(&dy), data(&gamma));
        let d = g.len();
        let mut dx = vec![0f32; h.len()];
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(ROWS * d)
            .enumerate()
            .map(|(chunk, dx)| {
                let (mut dg, mut db) = (vec![0f32; d], vec![0f32; d]);
                for (i, dx) in dx.chunks_mut(d).enumerate() {
                    let r = chunk * ROWS + i;
                    let span = r * d..(r + 1) * d;
                    layer_norm_grad_row(
                        &h[span.clone()],
                        &dys[span],
                        g,
                        rstd[r],
                        dx,
                        &mut dg,
                        &mut db,
                    );
                }
                (dg, db)
            })
            .collect();
        // Summed in chunk order, not in whatever order the threads finish: same seed, same bits.
        let (mut dg, mut db) = (vec![0f32; d], vec![0f32; d]);
        for (pg, pb) in partials {
            dg.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        let dx = flex(dx, shape(&xhat));
        if let Some(p) = pr {
            grads.register::<Flex>(p.id, dx.clone());
        }
        if let Some(p) = px {
            grads.register::<Flex>(p.id, dx);
        }
        if let Some(p) = pg {
            grads.register::<Flex>(p.id, flex(dg, Shape::new([d])));
        }
        if let Some(p) = pb {
            grads.register::<Flex>(p.id, flex(db, Shape::new([d])));
        }
    }
}

/// `LayerNorm(x [+ residual])·γ + β` over the last axis, in one parallel pass.
#[allow(clippy::type_complexity, clippy::result_large_err)]
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    residual: Option<Tensor<D>>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Result<Tensor<D>, (Tensor<D>, Option<Tensor<D>>, Tensor<1>, Tensor<1>)> {
    let ok = enabled()
        && is_flex_f32(&x)
        && residual
            .as_ref()
            .is_none_or(|r| is_flex_f32(r) && r.dims() == x.dims())
        && is_flex_f32(&gamma)
        && is_flex_f32(&beta);
    if !ok {
        return Err((x, residual, gamma, beta));
    }
    let (x, residual, gamma, beta) = (prim(x), residual.map(prim), prim(gamma), prim(beta));
    let any_ad = [Some(&x), residual.as_ref(), Some(&gamma), Some(&beta)]
        .into_iter()
        .flatten()
        .any(|p| matches!(p, Prim::Ad(_)));
    let rs = residual.as_ref().map(|r| contiguous(r.flex()));
    let (g, b) = (contiguous(gamma.flex()), contiguous(beta.flex()));
    let d = data(&g).len();
    let rows = |y: &mut [f32], xhat: Option<&mut [f32]>| -> Vec<f32> {
        let mut rstd = vec![0f32; y.len() / d];
        let block =
            |chunk: usize, y: &mut [f32], rstd: &mut [f32], mut xhat: Option<&mut [f32]>| {
                for (i, (y, rstd)) in y.chunks_mut(d).zip(rstd).enumerate() {
                    let span = (chunk * ROWS + i) * d..(chunk * ROWS + i + 1) * d;
                    let r = rs.as_ref().map(|r| &data(r)[span]);
                    let h = xhat.as_mut().map(|h| &mut h[i * d..(i + 1) * d]);
                    *rstd = layer_norm_row(y, r, data(&g), data(&b), eps as f32, h);
                }
            };
        let (ys, rstds) = (y.par_chunks_mut(ROWS * d), rstd.par_chunks_mut(ROWS));
        match xhat {
            Some(xhat) => ys
                .zip(rstds)
                .zip(xhat.par_chunks_mut(ROWS * d))
                .enumerate()
                .for_each(|(c, ((y, r), h))| block(c, y, r, Some(h))),
            None => ys
                .zip(rstds)
                .enumerate()
                .for_each(|(c, (y, r))| block(c, y, r, None)),
        }
        rstd
    };
    if !any_ad {
        // Inference: normalise x in place when nothing else holds it.
        let mut xs = contiguous(x.flex());
        drop(x);
        if let Some(y) = xs.try_storage_mut::<f32>() {
            rows(y, None);
            return Ok(plain(xs));
        }
        let mut y = data(&xs).to_vec();
        rows(&mut y, None);
        return Ok(plain(flex(y, shape(&xs))));
    }
    let xs = contiguous(x.flex());
    let mut y = data(&xs).to_vec();
    let mut xhat = vec![0f32; y.len()];
    let rstd = rows(&mut y, Some(&mut xhat));
    let y = flex(y, shape(&xs));
    let (x, gamma, beta) = (x.into_ad(), gamma.into_ad(), beta.into_ad());
    // Without a residual its parent slot holds an untracked stand-in (no gradient flows to it).
    let residual = residual.map_or_else(|| AdTensor::new(g.clone()), Prim::into_ad);
    let nodes = [x.node(), gamma.node(), beta.node(), residual.node()];
    Ok(tracked(
        match <_ as Backward<Flex, 4>>::prepare::<NoCheckpointing>(LayerNormBackward, nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                LayerNormState {
                    xhat: flex(xhat, shape(&xs)),
                    rstd: std::sync::Arc::new(rstd),
                    gamma: g,
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// The optimiser: one Adam-family update of a flat parameter in one parallel pass.

/// Whether `t` is a plain (not autodiff) f32 Flex tensor the kernels take.
pub fn takes<const D: usize>(t: &Tensor<D>) -> bool {
    enabled() && is_flex_f32(t) && !t.device().is_autodiff()
}

/// The update rule and its constants, as `train::optim` computes them (f64, then f32 as Burn
/// casts a scalar operand), so the kernel's arithmetic is the composite ops' to the bit.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// `None`: BertAdam (no bias correction, decay added to the update); `Some((1 − β₁ᵗ,
    /// 1 − β₂ᵗ))`: AdamW (bias-corrected, decoupled decay).
    pub bias_correction: Option<(f64, f64)>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub lr: f64,
    pub weight_decay: f64,
    /// Gradient clipping coefficient (1 for none).
    pub clip: f32,
}

simd_fn! {
    fn adam_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamStep) {
        let (b1, nb1) = (s.beta1 as f32, (1.0 - s.beta1) as f32);
        let (b2, nb2) = (s.beta2 as f32, (1.0 - s.beta2) as f32);
        let (eps, lr, wd) = (s.eps as f32, s.lr as f32, s.weight_decay as f32);
        match s.bias_correction {
            None => {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let g = g * s.clip;
                    *m = *m * b1 + g * nb1;
                    *v = *v * b2 + g * g * nb2;
                    let mut update = *m / (v.sqrt() + eps);
                    if wd > 0.0 {
                        update += *p * wd;
                    }
                    *p -= update * lr;
                }
            }
            Some((bc1, bc2)) => {
                let (bc1, bc2) = (bc1 as f32, bc2 as f32);
                let keep = (1.0 - s.lr * s.weight_decay) as f32;
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let g = g * s.clip;
                    *m = *m * b1 + g * nb1;
                    *v = *v * b2 + g * g * nb2;
                    let denom = (*v / bc2).sqrt() + eps;
                    *p = *p * keep - *m / bc1 / denom * lr;
                }
            }
        }
    }
}

/// One update of the flat parameter `p` with gradient `g` and moments `m`, `v`; returns the new
/// `(p, m, v)`. All four must be plain f32 Flex tensors ([`takes`]); overwritten in place when
/// nothing else holds them.
pub fn adam(
    p: Tensor<1>,
    g: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    step: &AdamStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let own = |t: Tensor<1>| -> FlexTensor {
        let mut t = contiguous(prim(t).flex());
        if t.try_storage_mut::<f32>().is_none() {
            t = flex(data(&t).to_vec(), shape(&t));
        }
        t
    };
    let (mut p, g, mut m, mut v) = (own(p), contiguous(prim(g).flex()), own(m), own(v));
    {
        let (ps, ms, vs) = (
            p.try_storage_mut::<f32>().expect("owned"),
            m.try_storage_mut::<f32>().expect("owned"),
            v.try_storage_mut::<f32>().expect("owned"),
        );
        ps.par_chunks_mut(CHUNK)
            .zip(data(&g).par_chunks(CHUNK))
            .zip(ms.par_chunks_mut(CHUNK).zip(vs.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| adam_chunk(p, g, m, v, step));
    }
    (plain(p), plain(m), plain(v))
}
