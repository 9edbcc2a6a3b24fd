//! Dropout with masks drawn in parallel from a counter-based hash.
//!
//! Same semantics as `burn::nn::Dropout` (and PyTorch's): active only on an autodiff device,
//! keeps each element with probability `1 − p` and scales kept ones by `1 / (1 − p)`. What
//! differs is how the mask is made. Burn samples a Bernoulli tensor element by element through a
//! ChaCha generator on one core, then multiplies twice (mask, then scale): ≈ 15 % of a MiniLM
//! training step here (BENCHMARKS.md, "where a training step goes"). Here one 64-bit seed is drawn
//! from the device's generator — so `device.seed(..)` still fixes every mask, and a resumed run
//! draws what the uninterrupted one drew — and element `i`'s keep decision is a SplitMix64 hash
//! of (seed, i), computed on all cores into a mask that already holds `1 / (1 − p)`: one multiply.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::Distribution;
use rayon::prelude::*;

use super::kernels;

/// `nn.Dropout(p)` (HF `hidden_dropout_prob`, `attention_probs_dropout_prob`).
#[derive(Module, Debug)]
pub struct Dropout {
    pub prob: f64,
}

impl Dropout {
    pub fn new(prob: f64) -> Self {
        assert!(
            prob.is_finite() && (0.0..1.0).contains(&prob),
            "dropout probability must be in [0, 1), got {prob}"
        );
        Self { prob }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let device = x.device();
        if self.prob == 0.0 || !device.is_autodiff() {
            return x;
        }
        let keep = 1.0 - self.prob;
        if !is_cpu(&device) {
            // On a GPU the backend's own sampler runs where the data is.
            let mask = x.random_like(Distribution::Bernoulli(keep));
            return x * mask * (1.0 / keep);
        }
        let seed = draw_seed(&device);
        match kernels::dropout(x, MaskStream::new(seed, keep)) {
            Ok(y) => y,
            Err(x) => {
                let shape = x.shape();
                let mask = keep_mask(seed, shape.num_elements(), keep);
                // In the device's default float type; `x` may be half precision.
                let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &device);
                let dtype = x.dtype();
                x * mask.cast(dtype)
            }
        }
    }
}

fn is_cpu(device: &Device) -> bool {
    let flex = Device::flex();
    *device == flex || *device == flex.autodiff()
}

/// 64 bits from the device's generator (two draws of 32 bits, exact in f64).
fn draw_seed(device: &Device) -> u64 {
    let r = Tensor::<1>::random([2], Distribution::Uniform(0.0, 4_294_967_296.0), device)
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32 random draw");
    // f32 holds 24 significant bits of each draw: 48 bits of seed, hashed below anyway.
    ((r[0] as u64) << 32) ^ (r[1] as u64)
}

/// SplitMix64's output function: a bijective 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The keep decisions of one dropout call: element `i`'s depends only on `(seed, i)`, so a mask
/// is the same however the work is split across threads.
#[derive(Clone, Copy, Debug)]
pub struct MaskStream {
    base: u64,
    /// keep probability as a 32-bit threshold: P(u < t) = t / 2^32 for u uniform on 32 bits.
    threshold: u64,
    scale: f32,
}

impl MaskStream {
    pub fn new(seed: u64, keep: f64) -> Self {
        Self {
            base: mix(seed),
            threshold: (keep * 4_294_967_296.0).round().min(u32::MAX as f64) as u64,
            scale: (1.0 / keep) as f32,
        }
    }

    /// The scale of kept elements, `1 / keep`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// `out[k] = f(k, m)` for the mask values `m` (`1 / keep` or 0) of elements
    /// `start + k`; `start` must be even.
    #[inline(always)]
    pub fn for_each(&self, start: usize, n: usize, mut f: impl FnMut(usize, f32)) {
        debug_assert!(start.is_multiple_of(2));
        for pair in 0..n.div_ceil(2) {
            // One hash gives two 32-bit draws.
            let r = mix(self.base.wrapping_add(
                (start as u64 / 2 + pair as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            for j in 0..2.min(n - 2 * pair) {
                let u = (r >> (32 * j)) & 0xFFFF_FFFF;
                f(
                    2 * pair + j,
                    if u < self.threshold { self.scale } else { 0.0 },
                );
            }
        }
    }
}

/// `n` values, each `1 / keep` with probability `keep` and 0 otherwise (see [`MaskStream`]).
pub fn keep_mask(seed: u64, n: usize, keep: f64) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    let stream = MaskStream::new(seed, keep);
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        stream.for_each(c * CHUNK, out.len(), |k, m| out[k] = m);
    });
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_rate_and_scale() {
        let n = 1 << 20;
        for keep in [0.9, 0.5] {
            let m = keep_mask(7, n, keep);
            let kept = m.iter().filter(|&&v| v != 0.0).count() as f64;
            // binomial std = sqrt(n·p·(1-p)) ≈ 512 at p = 0.5: 6 std
            let std = (n as f64 * keep * (1.0 - keep)).sqrt();
            assert!((kept - n as f64 * keep).abs() < 6.0 * std, "kept {kept}");
            assert!(
                m.iter()
                    .all(|&v| v == 0.0 || (v - (1.0 / keep) as f32).abs() < 1e-6)
            );
        }
    }

    #[test]
    fn mask_depends_on_seed_only() {
        assert_eq!(keep_mask(3, 50_001, 0.9), keep_mask(3, 50_001, 0.9));
        assert_ne!(keep_mask(3, 50_001, 0.9), keep_mask(4, 50_001, 0.9));
        // a prefix of a longer mask is the shorter mask (position-wise hashing)
        assert_eq!(
            keep_mask(3, 40_000, 0.9)[..],
            keep_mask(3, 50_001, 0.9)[..40_000]
        );
    }

    #[test]
    fn neighbours_are_not_correlated() {
        let m = keep_mask(11, 1 << 18, 0.5);
        let both = m
            .chunks(2)
            .filter(|p| p.len() == 2 && p[0] != 0.0 && p[1] != 0.0)
            .count() as f64;
        let pairs = (m.len() / 2) as f64;
        // P(both kept) = 0.25 if independent; std ≈ sqrt(pairs·0.25·0.75) ≈ 157
        assert!(
            (both - 0.25 * pairs).abs() < 6.0 * (pairs * 0.1875).sqrt(),
            "{both}"
        );
    }

    #[test]
    fn seeded_device_repeats_masks_and_identity_without_autodiff() {
        let ad = Device::flex().autodiff();
        let x = Tensor::<2>::ones([64, 64], &ad);
        let d = Dropout::new(0.25);
        ad.seed(5);
        let a = d
            .forward(x.clone())
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        ad.seed(5);
        let b = d
            .forward(x.clone())
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(a, b);
        let c = d.forward(x).into_data().try_into_vec::<f32>().unwrap();
        assert_ne!(a, c);
        let plain = Tensor::<2>::ones([8, 8], &Device::flex());
        let y = d.forward(plain).into_data().try_into_vec::<f32>().unwrap();
        assert!(y.iter().all(|&v| v == 1.0));
    }
}
