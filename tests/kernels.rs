//! The fused Flex kernels against the composite Burn formulations they replace: values and
//! gradients, on shapes that are not multiples of the SIMD width or of the rows per task, with
//! padded keys.

use burn::prelude::*;
use burn::tensor::activation;
use mpcformer::model::Attn;
use mpcformer::model::approx::{QUAD_A, QUAD_B, QUAD_C, TWO_QUAD_C};
use mpcformer::model::kernels::{self, Gelu, Normaliser, Quad};

/// Deterministic values in about [-scale, scale].
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor<const D: usize>(dims: [usize; D], seed: u64, scale: f32, device: &Device) -> Tensor<D> {
    let n = dims.iter().product();
    Tensor::<1>::from_floats(values(n, seed, scale).as_slice(), device).reshape(dims)
}

/// `t` as a leaf on another device (the autodiff one, and back).
fn on<const D: usize>(t: &Tensor<D>, device: &Device) -> Tensor<D> {
    Tensor::from_data(t.to_data(), device)
}

fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

fn max_abs<const D: usize>(a: Tensor<D>) -> f32 {
    a.abs().max().into_scalar::<f32>()
}

/// The 0/1 key mask [B, Lk] with `real[b]` real tokens in row b.
fn key_mask(real: &[usize], lk: usize, device: &Device) -> Tensor<2> {
    let m: Vec<f32> = real
        .iter()
        .flat_map(|&r| (0..lk).map(move |j| if j < r { 1.0 } else { 0.0 }))
        .collect();
    Tensor::<1>::from_floats(m.as_slice(), device).reshape([real.len(), lk])
}

/// Gradient of `Σ f(x)·w` with respect to `x`, on the autodiff device.
fn grad<const D: usize>(
    x: &Tensor<D>,
    w: &Tensor<D>,
    f: impl Fn(Tensor<D>) -> Tensor<D>,
) -> Tensor<D> {
    let ad = Device::flex().autodiff();
    let xa = on(x, &ad).require_grad();
    let loss = (f(xa.clone()) * on(w, &ad)).sum();
    let g = loss.backward();
    on(&xa.grad(&g).expect("x gets a gradient"), &Device::flex())
}

#[test]
fn elementwise_kernels_run_on_flex_and_match_the_composite_ops() {
    let device = Device::flex();
    let x = tensor([3, 37, 29], 1, 6.0, &device);
    let w = tensor([3, 37, 29], 2, 1.0, &device);

    let quad = |x: Tensor<3>| (x.clone() * QUAD_A + QUAD_B) * x + QUAD_C;
    let fused_quad = |x: Tensor<3>| {
        kernels::elementwise::<Quad, 3>(x).unwrap_or_else(|_| panic!("Quad kernel on Flex f32"))
    };
    assert!(max_diff(fused_quad(x.clone()), quad(x.clone())) < 1e-5);
    let (gk, gc) = (grad(&x, &w, fused_quad), grad(&x, &w, quad));
    assert!(max_diff(gk, gc) < 1e-5);

    let fused_gelu = |x: Tensor<3>| {
        kernels::elementwise::<Gelu, 3>(x).unwrap_or_else(|_| panic!("GeLU kernel on Flex f32"))
    };
    // Burn's GeLU uses libm's erff; ours the A&S polynomial (|error| ≤ 1.5e-7 in erf).
    let d = max_diff(fused_gelu(x.clone()), activation::gelu(x.clone()));
    assert!(d < 5e-6, "GeLU forward differs by {d}");
    let d = max_diff(grad(&x, &w, fused_gelu), grad(&x, &w, activation::gelu));
    assert!(d < 5e-6, "GeLU gradient differs by {d}");
    // Far tails: exactly 0 and x.
    let tails = Tensor::<1>::from_floats([-30.0, -12.0, 12.0, 30.0], &device);
    let y: Vec<f32> = fused_gelu(tails.unsqueeze::<3>())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(y, vec![-0.0, -0.0, 12.0, 30.0]);
}

#[test]
fn attention_normalisers_match_the_composite_ops_with_padded_keys() {
    let device = Device::flex();
    // 3·4·13 = 156 rows: several parallel tasks and a partial one; Lk = 19 is not a multiple of 8.
    let (b, h, lq, lk) = (3, 4, 13, 19);
    let s = tensor([b, h, lq, lk], 3, 4.0, &device);
    let w = tensor([b, h, lq, lk], 4, 1.0, &device);
    let mask = key_mask(&[19, 7, 1], lk, &device);
    for (attn, kind) in [
        (Attn::Softmax, Normaliser::Softmax),
        (Attn::TwoQuad, Normaliser::TwoQuad(TWO_QUAD_C as f32)),
    ] {
        let fused = |s: Tensor<4>| {
            let m = on(&mask, &s.device());
            kernels::normalise(kind, s, m).unwrap_or_else(|_| panic!("{attn} kernel on Flex f32"))
        };
        let composite = |s: Tensor<4>| {
            let m = on(&mask, &s.device());
            attn.composite(s, m, TWO_QUAD_C)
        };
        let (pk, pc) = (fused(s.clone()), composite(s.clone()));
        assert!(max_diff(pk.clone(), pc) < 1e-6, "{attn} forward");
        // Rows sum to 1; padded keys get exactly 0.
        let sums = pk.clone().sum_dim(3);
        assert!(
            max_diff(sums.clone(), sums.ones_like()) < 1e-5,
            "{attn} row sums"
        );
        let padded = pk.slice([1..2, 0..h, 0..lq, 7..lk]);
        assert_eq!(max_abs(padded), 0.0, "{attn}: a padded key gets weight");
        let (gk, gc) = (grad(&s, &w, fused), grad(&s, &w, composite));
        let scale = max_abs(gc.clone());
        assert!(max_diff(gk, gc) < 1e-5 * scale.max(1.0), "{attn} gradient");
    }
    // Through the public entry point, the kernel is what `Attn::apply` runs on Flex.
    let applied = Attn::TwoQuad.apply(s.clone(), mask.clone(), TWO_QUAD_C);
    let composite = Attn::TwoQuad.composite(s, mask, TWO_QUAD_C);
    assert!(max_diff(applied, composite) < 1e-6);
}

#[test]
fn layer_norm_kernel_matches_the_composite_with_and_without_residual() {
    let device = Device::flex();
    let (rows, d) = (70, 45);
    let x = tensor([2, rows / 2, d], 5, 3.0, &device) + 0.7;
    let r = tensor([2, rows / 2, d], 6, 2.0, &device);
    let gamma = tensor([d], 7, 1.0, &device) + 1.0;
    let beta = tensor([d], 8, 0.5, &device);
    let w = tensor([2, rows / 2, d], 9, 1.0, &device);
    let eps = 1e-12;
    for residual in [false, true] {
        let fused = |x: Tensor<3>, r: Tensor<3>, g: Tensor<1>, b: Tensor<1>| {
            kernels::layer_norm(x, residual.then_some(r), g, b, eps)
                .unwrap_or_else(|_| panic!("LayerNorm kernel on Flex f32"))
        };
        let composite = |x: Tensor<3>, r: Tensor<3>, g: Tensor<1>, b: Tensor<1>| {
            let x = if residual { x + r } else { x };
            burn::tensor::module::layer_norm(x, g, Some(b), eps)
        };
        let d_fwd = max_diff(
            fused(x.clone(), r.clone(), gamma.clone(), beta.clone()),
            composite(x.clone(), r.clone(), gamma.clone(), beta.clone()),
        );
        assert!(
            d_fwd < 1e-5,
            "forward (residual {residual}) differs by {d_fwd}"
        );

        // Gradients of every input.
        let ad = device.clone().autodiff();
        let grads = |f: &dyn Fn(Tensor<3>, Tensor<3>, Tensor<1>, Tensor<1>) -> Tensor<3>| {
            let xa = on(&x, &ad).require_grad();
            let ra = on(&r, &ad).require_grad();
            let ga = on(&gamma, &ad).require_grad();
            let ba = on(&beta, &ad).require_grad();
            let loss = (f(xa.clone(), ra.clone(), ga.clone(), ba.clone())
                * w.clone().to_device(&ad))
            .sum();
            let g = loss.backward();
            (
                on(&xa.grad(&g).unwrap(), &device),
                ra.grad(&g).map(|t| on(&t, &device)),
                on(&ga.grad(&g).unwrap(), &device),
                on(&ba.grad(&g).unwrap(), &device),
            )
        };
        let (fx, fr, fg, fb) = grads(&fused);
        let (cx, cr, cg, cb) = grads(&composite);
        assert!(max_diff(fx, cx) < 1e-4, "dx (residual {residual})");
        assert!(max_diff(fg, cg) < 1e-4, "dγ (residual {residual})");
        assert!(max_diff(fb, cb) < 1e-4, "dβ (residual {residual})");
        match (fr, cr) {
            (Some(fr), Some(cr)) => assert!(max_diff(fr, cr) < 1e-4, "d residual"),
            (None, None) => assert!(!residual),
            (f, c) => panic!(
                "residual gradient: fused {:?} composite {:?}",
                f.is_some(),
                c.is_some()
            ),
        }
    }
}

#[test]
fn kernels_decline_what_they_do_not_cover() {
    // f64 tensors take the composite path (the caller's `Err` branch).
    let device = Device::flex();
    let x = tensor([4, 8], 10, 1.0, &device).cast(burn::tensor::DType::F64);
    assert!(kernels::elementwise::<Quad, 2>(x).is_err());
}

#[test]
fn dropout_kernel_applies_the_seeded_mask_and_masks_the_gradient() {
    use mpcformer::model::dropout::{MaskStream, keep_mask};
    let device = Device::flex();
    let ad = device.clone().autodiff();
    // Not a multiple of the kernel's chunk, so the last chunk is partial and odd-sized.
    let dims = [3, 11_111];
    let n = 3 * 11_111;
    let x = tensor(dims, 12, 2.0, &device);
    let w = tensor(dims, 13, 1.0, &device);
    let (seed, keep) = (99, 0.9);
    let mask = Tensor::<1>::from_floats(keep_mask(seed, n, keep).as_slice(), &device).reshape(dims);

    let xa = on(&x, &ad).require_grad();
    let y = kernels::dropout(xa.clone(), MaskStream::new(seed, keep))
        .unwrap_or_else(|_| panic!("dropout kernel on autodiff Flex f32"));
    let expected = x * mask.clone();
    assert_eq!(
        on(&y, &device).into_data().try_to_vec::<f32>().unwrap(),
        expected.into_data().try_to_vec::<f32>().unwrap()
    );
    let g = (y * on(&w, &ad)).sum().backward();
    let dx = on(&xa.grad(&g).unwrap(), &device);
    assert_eq!(max_diff(dx, w * mask), 0.0);
}

#[test]
fn adam_kernel_is_the_composite_update_to_the_bit() {
    use kernels::AdamStep;
    let device = Device::flex();
    let n = 40_003;
    let p = tensor([n], 20, 1.0, &device);
    let g = tensor([n], 21, 0.1, &device);
    let m = tensor([n], 22, 0.01, &device);
    let v = tensor([n], 23, 0.001, &device).abs();
    let bits = |t: Tensor<1>| -> Vec<u32> {
        t.into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    for (bias_correction, wd, clip) in [
        (None, 0.01, 0.5f32),
        (None, 0.0, 1.0),
        (
            Some((1.0 - 0.9f64.powi(3), 1.0 - 0.999f64.powi(3))),
            0.01,
            0.25,
        ),
    ] {
        let s = AdamStep {
            bias_correction,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            lr: 2e-5,
            weight_decay: wd,
            clip,
        };
        assert!(kernels::takes(&p));
        let (pk, mk, vk) = kernels::adam(p.clone(), g.clone(), m.clone(), v.clone(), &s);
        // The composite ops of `train::optim`, scalar operands cast to f32 as Burn does.
        let gc = g.clone() * clip as f64;
        let mc = m.clone() * s.beta1 + gc.clone() * (1.0 - s.beta1);
        let vc = v.clone() * s.beta2 + gc.square() * (1.0 - s.beta2);
        let pc = match bias_correction {
            None => {
                let mut update = mc.clone() / (vc.clone().sqrt() + s.eps);
                if wd > 0.0 {
                    update = update + p.clone() * wd;
                }
                p.clone() - update * s.lr
            }
            Some((bc1, bc2)) => {
                let decayed = p.clone() * (1.0 - s.lr * wd);
                let denom = (vc.clone() / bc2).sqrt() + s.eps;
                decayed - (mc.clone() / bc1) / denom * s.lr
            }
        };
        assert_eq!(bits(mk), bits(mc), "m");
        assert_eq!(bits(vk), bits(vc), "v");
        assert_eq!(bits(pk), bits(pc), "p ({bias_correction:?})");
    }
    // The inputs were shared (cloned), so they were copied, not overwritten.
    assert_eq!(bits(p.clone()), bits(tensor([n], 20, 1.0, &device)));
}

#[test]
fn layer_norm_parameter_gradients_are_the_same_bits_every_time() {
    // dγ and dβ sum per-task partials over 2,000 rows (63 tasks): in a fixed order, so a rerun
    // with the same seed gives the same weights whatever the threads do.
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let (rows, d) = (2_000, 64);
    let x = tensor([rows, d], 30, 2.0, &device);
    let w = tensor([rows, d], 31, 1.0, &device);
    let gamma = tensor([d], 32, 1.0, &device) + 1.0;
    let beta = tensor([d], 33, 0.5, &device);
    let run = || {
        let ga = on(&gamma, &ad).require_grad();
        let y = kernels::layer_norm(on(&x, &ad), None, ga.clone(), on(&beta, &ad), 1e-12)
            .unwrap_or_else(|_| panic!("LayerNorm kernel"));
        let g = (y * on(&w, &ad)).sum().backward();
        on(&ga.grad(&g).unwrap(), &device)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect::<Vec<u32>>()
    };
    let first = run();
    for _ in 0..5 {
        assert_eq!(run(), first);
    }
}
