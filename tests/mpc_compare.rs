//! Issue 9's protocols against plaintext: comparison (`ltz`, ReLU, row max) near 0 and near
//! the fixed-point limits, exp, BERT's masked softmax, GeLU over the range real activations
//! reach, 2ReLU; rounds and bytes; the offline/online split. Issue 16's exact truncation on
//! share splits where SecureML's local truncation fails.

use std::time::Duration;

use mpcformer::mpc::Party;
use mpcformer::mpc::compare::{GeluKind, GeluPlan, SoftmaxPlan, erf};
use mpcformer::mpc::dealer::{Dealer, DealerClient};
use mpcformer::mpc::net::{Net, mem_pair};
use mpcformer::mpc::protocols::{Ctx, NewtonKind, NewtonPlan};
use mpcformer::mpc::ring::{FixedPoint, RingTensor};
use mpcformer::mpc::share::{AShare, BShare};
use mpcformer::mpc::trunc::Truncation;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

fn fp() -> FixedPoint {
    FixedPoint::default()
}

/// Runs `f` as P0 (a thread) and P1 (this thread) with a dealer thread.
fn two_party<T: Send>(f: impl Fn(&mut Ctx) -> T + Sync) -> (T, T) {
    let t = Duration::from_secs(30);
    let (c0, c1) = mem_pair(t);
    let (d1, mut dd) = mem_pair(t);
    let mut dealer = Dealer::new();
    let (s0, s1) = (dealer.seed(Party::P0), dealer.seed(Party::P1));
    std::thread::scope(|s| {
        let dh = s.spawn(move || dealer.serve(&mut dd).unwrap());
        let f = &f;
        let h = s.spawn(move || {
            let mut ctx = Ctx::new(
                fp(),
                Net::new(Box::new(c0)),
                DealerClient::new(Party::P0, s0, None).unwrap(),
            );
            f(&mut ctx)
        });
        let mut ctx = Ctx::new(
            fp(),
            Net::new(Box::new(c1)),
            DealerClient::new(Party::P1, s1, Some(Box::new(d1))).unwrap(),
        );
        let r1 = f(&mut ctx);
        ctx.dealer.finish().unwrap();
        let r0 = h.join().unwrap();
        dh.join().unwrap();
        (r0, r1)
    })
}

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

fn uniform(r: &mut ChaCha20Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n)
        .map(|_| lo + (hi - lo) * (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
        .collect()
}

fn shares_of(t: &RingTensor, seed: u64) -> [AShare; 2] {
    let (a, b) = AShare::share(t, &mut rng(seed));
    [a, b]
}

fn shares(v: &[f64], shape: &[usize], seed: u64) -> [AShare; 2] {
    shares_of(&RingTensor::from_f64(fp(), shape, v).unwrap(), seed)
}

fn pick(s: &[AShare; 2], p: Party) -> &AShare {
    &s[p.index()]
}

fn open(a: &AShare, b: &AShare) -> Vec<f64> {
    AShare::reconstruct(a, b).unwrap().to_f64(fp())
}

fn open_int(a: &AShare, b: &AShare) -> Vec<i64> {
    AShare::reconstruct(a, b)
        .unwrap()
        .data
        .iter()
        .map(|&v| v as i64)
        .collect()
}

fn max_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max)
}

const ULP: f64 = 1.0 / 65536.0;

/// Ring integers near 0, near ±2^62 and the fixed-point limits ±2^(63−f)·2^f = ±2^63 (exclusive),
/// and random ones of every magnitude.
fn edge_values(seed: u64) -> Vec<u64> {
    let mut v: Vec<i64> = vec![
        0,
        1,
        -1,
        2,
        -2,
        65535,
        65536,
        -65536,
        -65537,
        i64::MAX,
        i64::MIN,
        i64::MAX - 1,
        i64::MIN + 1,
        1 << 62,
        -(1 << 62),
        (1 << 62) - 1,
        -(1 << 62) + 1,
        (1 << 46) * 65536 + 1, // ±2^46 in fixed point (f = 16), just inside the limit 2^47
        -(1 << 46) * 65536 - 1,
    ];
    let mut r = rng(seed);
    for i in 0..600 {
        let bits = i % 64;
        let x = (r.next_u64() >> (63 - bits)) as i64;
        v.push(if i % 2 == 0 { x } else { x.wrapping_neg() });
    }
    v.into_iter().map(|x| x as u64).collect()
}

#[test]
fn ltz_is_exact_near_zero_and_the_ring_limits() {
    let vals = edge_values(1);
    let n = vals.len();
    let t = RingTensor::new(vec![n], vals.clone()).unwrap();
    // Several dealer seeds and share splits: the result must not depend on them.
    for seed in 0..3 {
        let s = shares_of(&t, 10 + seed);
        let (r0, r1) = two_party(|ctx| {
            ctx.op("ltz");
            let b = ctx.ltz(pick(&s, ctx.party)).unwrap();
            (b, ctx.net.stats.snapshot())
        });
        let got = open_int(&r0.0, &r1.0);
        for (i, &v) in vals.iter().enumerate() {
            assert_eq!(got[i], i64::from((v as i64) < 0), "element {i}");
        }
        let st0 = &r0.1.iter().find(|x| x.0 == "ltz").unwrap().1;
        let st1 = &r1.1.iter().find(|x| x.0 == "ltz").unwrap().1;
        assert_eq!(st0.rounds, 8, "A2B + 6 tree levels + B2A");
        // ≈ 4.9 words per element plus frame headers (8 frames).
        let per_elem = (st0.bytes_sent.max(st1.bytes_sent) - 8 * 8) as f64 / n as f64;
        assert!(per_elem <= 42.0, "{per_elem} bytes per element");
        if seed == 0 {
            eprintln!("ltz: {per_elem:.1} bytes per element per party, 8 rounds");
        }
    }
}

#[test]
fn binary_and_and_b2a_match_plaintext() {
    let mut r = rng(2);
    let x: Vec<u64> = (0..37).map(|_| r.next_u64()).collect();
    let y: Vec<u64> = (0..37).map(|_| r.next_u64()).collect();
    let (x0, x1) = BShare::share(&x, &mut r);
    let (y0, y1) = BShare::share(&y, &mut r);
    let bits: Vec<u64> = vec![r.next_u64(), r.next_u64() & 0xff];
    let (b0, b1) = BShare::share(&bits, &mut r);
    let (r0, r1) = two_party(|ctx| {
        let p0 = ctx.party == Party::P0;
        let (xs, ys, bs) = if p0 { (&x0, &y0, &b0) } else { (&x1, &y1, &b1) };
        let z = ctx.and(xs, ys).unwrap();
        let a = ctx.b2a(bs, 72).unwrap();
        (z, a)
    });
    let z = BShare::reconstruct(&r0.0, &r1.0).unwrap();
    for i in 0..x.len() {
        assert_eq!(z[i], x[i] & y[i]);
    }
    let a = open_int(&r0.1, &r1.1);
    for (j, v) in a.iter().enumerate() {
        assert_eq!(*v as u64, (bits[j / 64] >> (j % 64)) & 1, "bit {j}");
    }
}

#[test]
fn relu_and_row_max_are_exact() {
    let mut r = rng(3);
    let (rows, l) = (7, 13); // odd width: a leftover column at several levels
    let mut x = uniform(&mut r, rows * l, -50.0, 50.0);
    x[0] = 0.0;
    x[1] = ULP;
    x[2] = -ULP;
    x[l] = 1000.0; // row 1: a big max
    x[2 * l..3 * l].iter_mut().for_each(|v| *v = -3.0); // ties
    let t = RingTensor::from_f64(fp(), &[rows, l], &x).unwrap();
    let s = shares_of(&t, 4);
    let (r0, r1) = two_party(|ctx| {
        let p = ctx.party;
        ctx.op("relu");
        let y = ctx.relu(pick(&s, p)).unwrap();
        ctx.op("max");
        let m = ctx.max_last(pick(&s, p)).unwrap();
        (y, m, ctx.net.stats.snapshot())
    });
    let xe = t.to_f64(fp()); // the encoded values
    let relu: Vec<f64> = xe.iter().map(|v| v.max(0.0)).collect();
    assert_eq!(open(&r0.0, &r1.0), relu, "relu is exact");
    let mx: Vec<f64> = (0..rows)
        .map(|i| {
            xe[i * l..(i + 1) * l]
                .iter()
                .cloned()
                .fold(f64::MIN, f64::max)
        })
        .collect();
    assert_eq!(open(&r0.1, &r1.1), mx, "max is exact");
    let st = |lab: &str| r0.2.iter().find(|x| x.0 == lab).unwrap().1.rounds;
    assert_eq!(st("relu"), 9);
    assert_eq!(st("max"), 9 * 4, "⌈log2 13⌉ = 4 levels");
}

#[test]
fn exp_limit_matches_plaintext_on_its_range() {
    let mut r = rng(5);
    let n = 400;
    let mut x = uniform(&mut r, n, -30.0, 0.0);
    x[0] = 0.0;
    x[1] = -ULP;
    let s = shares(&x, &[n], 6);
    let (r0, r1) = two_party(|ctx| ctx.exp_limit(pick(&s, ctx.party), 8).unwrap());
    let got = open(&r0, &r1);
    let mut worst: f64 = 0.0;
    for (g, v) in got.iter().zip(&x) {
        let limit = (1.0 + v / 256.0).powi(256);
        // Fixed point: the base is within an ulp, and 256 powers multiply its relative error.
        assert!(
            (g - limit).abs() <= 600.0 * ULP * limit + 4.0 * ULP,
            "x = {v}: {g} vs {limit}"
        );
        worst = worst.max((g - v.exp()).abs());
    }
    eprintln!("exp (n = 8) on [−30, 0]: max |error| vs exp {worst:.2e}");
    assert!(worst < 1e-2);
}

/// The plaintext model's softmax with BERT's additive mask (`approx::Attn::apply`).
fn softmax_plain(scores: &[f64], mask: &[u64], (b, h, l): (usize, usize, usize)) -> Vec<f64> {
    let mut out = vec![0.0; scores.len()];
    for row in 0..b * h * l {
        let bi = row / (h * l);
        let x: Vec<f64> = (0..l)
            .map(|k| scores[row * l + k] + (1.0 - mask[bi * l + k] as f64) * -10000.0)
            .collect();
        let m = x.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for k in 0..l {
            out[row * l + k] = e[k] / z;
        }
    }
    out
}

fn softmax_plan(l: usize) -> SoftmaxPlan {
    SoftmaxPlan {
        exp_iters: 8,
        recip: NewtonPlan::new(NewtonKind::Reciprocal, 0.5, l as f64 + 1.0, 1e-4).unwrap(),
    }
}

#[test]
fn masked_softmax_matches_the_plaintext_model() {
    let mut r = rng(7);
    let (b, h, l) = (2, 2, 12);
    let mut scores = uniform(&mut r, b * h * l * l, -12.0, 12.0);
    // Masked keys with scores above the real maximum must not count.
    let mask: Vec<u64> = [vec![1; 9], vec![0; 3], vec![1; 12]].concat();
    for row in 0..h * l {
        scores[row * l + 10] = 40.0;
    }
    let s = shares(&scores, &[b, h, l, l], 8);
    let plan = softmax_plan(l);
    let (r0, r1) = two_party(|ctx| {
        ctx.op("softmax");
        let p = ctx.softmax(pick(&s, ctx.party), &mask, &plan).unwrap();
        (p, ctx.net.stats.snapshot())
    });
    let got = open(&r0.0, &r1.0);
    let want = softmax_plain(&scores, &mask, (b, h, l));
    let e = max_err(&got, &want);
    eprintln!("softmax (n = 8): max |error| {e:.2e}");
    assert!(e <= 5e-3, "softmax: {e:.2e}");
    for (i, w) in want.iter().enumerate() {
        if mask[(i / (h * l * l)) * l + i % l] == 0 {
            assert_eq!(got[i], 0.0, "masked keys get exactly 0 ({w:e})");
        }
    }
    let rounds = r0.1.iter().find(|x| x.0 == "softmax").unwrap().1.rounds;
    // 8 squarings, each followed by its exact truncation (the default).
    assert_eq!(rounds as u32, 9 * 4 + 8 * 2 + plan.recip.rounds() + 1);
    let (l0, l1) = two_party(|ctx| {
        ctx.truncation = Truncation::Local;
        ctx.op("softmax");
        let p = ctx.softmax(pick(&s, ctx.party), &mask, &plan).unwrap();
        (p, ctx.net.stats.snapshot())
    });
    assert!(max_err(&open(&l0.0, &l1.0), &want) <= 5e-3);
    let rounds = l0.1.iter().find(|x| x.0 == "softmax").unwrap().1.rounds;
    assert_eq!(rounds as u32, 9 * 4 + 8 + plan.recip.rounds() + 1);
}

#[test]
fn gelu_matches_erf_gelu_over_real_activation_ranges() {
    let plan = GeluPlan::new(GeluKind::Erf);
    // Dense near the kinks of the piecewise form and over ±8, sparse out to ±50 and ±1000.
    let mut x: Vec<f64> = (0..=1600)
        .map(|i| -8.0 + 16.0 * i as f64 / 1600.0)
        .collect();
    x.extend((0..=200).map(|i| -50.0 + 100.0 * i as f64 / 200.0));
    x.extend([
        -1000.0,
        1000.0,
        4.0,
        -4.0,
        4.0 - ULP,
        -4.0 - ULP,
        3.9999,
        -3.9999,
    ]);
    let n = x.len();
    let s = shares(&x, &[n], 9);
    let (r0, r1) = two_party(|ctx| {
        ctx.op("gelu");
        let y = ctx.gelu(pick(&s, ctx.party), &plan).unwrap();
        (y, ctx.net.stats.snapshot())
    });
    let got = open(&r0.0, &r1.0);
    let want: Vec<f64> = x
        .iter()
        .map(|&v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt())))
        .collect();
    let e = max_err(&got, &want);
    let rounds = r0.1.iter().find(|x| x.0 == "gelu").unwrap().1.rounds;
    eprintln!(
        "GeLU (T = {}, degree {} in x²): max |error| vs erf GeLU on ±1000 {e:.2e} (exact arithmetic {:.2e}), {rounds} rounds",
        plan.t,
        plan.coeffs.len() - 1,
        plan.max_err
    );
    assert!(e <= 5e-4, "gelu: {e:.2e}");
    assert_eq!(rounds as u32, plan.rounds(Truncation::Exact));
    assert_eq!(plan.rounds(Truncation::Local), 13);
}

#[test]
fn two_relu_matches_plaintext() {
    let mut r = rng(10);
    let (b, h, l) = (2, 2, 10);
    let mut scores = uniform(&mut r, b * h * l * l, -3.0, 6.0);
    // Row 3: all scores ≤ 0 → 1/L on every key (masked ones too), as the reference.
    scores[3 * l..4 * l].iter_mut().for_each(|v| *v = -v.abs());
    // Row 4: only masked keys positive → also a zero row.
    scores[4 * l..5 * l].iter_mut().for_each(|v| *v = -v.abs());
    scores[4 * l + 8] = 3.0;
    let mask: Vec<u64> = [vec![1; 7], vec![0; 3], vec![1; 10]].concat();
    let s = shares(&scores, &[b, h, l, l], 11);
    let plan = NewtonPlan::new(NewtonKind::Reciprocal, 0.25, 200.0, 1e-4).unwrap();
    let (r0, r1) = two_party(|ctx| ctx.two_relu(pick(&s, ctx.party), &mask, &plan).unwrap());
    let got = open(&r0, &r1);
    let mut want = vec![0.0; scores.len()];
    for row in 0..b * h * l {
        let bi = row / (h * l);
        let rr: Vec<f64> = (0..l)
            .map(|k| scores[row * l + k].max(0.0) * mask[bi * l + k] as f64)
            .collect();
        let z: f64 = rr.iter().sum::<f64>() + 1e-12;
        for k in 0..l {
            want[row * l + k] = (rr[k] + 1e-12 / l as f64) / z;
        }
    }
    let e = max_err(&got, &want);
    assert!(e <= 1e-3, "2relu: {e:.2e}");
    assert!((got[3 * l] - 0.1).abs() < 1e-4 && (got[4 * l + 8] - 0.1).abs() < 1e-4);
}

/// The new rounds run from offline material (dealer traffic before the input, none after) and
/// give the same results.
#[test]
fn comparisons_run_from_offline_material() {
    let mut r = rng(12);
    let (b, h, l) = (1, 2, 8);
    let scores = uniform(&mut r, b * h * l * l, -6.0, 6.0);
    let mask: Vec<u64> = [vec![1; 6], vec![0; 2]].concat();
    let s = shares(&scores, &[b, h, l, l], 13);
    let x = uniform(&mut r, 50, -10.0, 10.0);
    let sx = shares(&x, &[50], 14);
    let plan = softmax_plan(l);
    let gp = GeluPlan::new(GeluKind::Erf);
    let (r0, r1) = two_party(|ctx| {
        let p = ctx.party;
        let zs = AShare::zeros(p, &[b, h, l, l]);
        let zx = AShare::zeros(p, &[50]);
        ctx.op("offline");
        ctx.begin_offline();
        ctx.softmax(&zs, &[1; 8], &plan).unwrap();
        ctx.gelu(&zx, &gp).unwrap();
        ctx.end_offline().unwrap();
        ctx.op("online");
        let y = ctx.softmax(pick(&s, p), &mask, &plan).unwrap();
        let g = ctx.gelu(pick(&sx, p), &gp).unwrap();
        assert_eq!(ctx.prepared_rounds(), 0);
        (y, g, ctx.net.stats.snapshot())
    });
    let on = &r1.2.iter().find(|x| x.0 == "online").unwrap().1;
    assert_eq!(on.dealer_bytes, 0, "online: no dealer traffic");
    let off = &r1.2.iter().find(|x| x.0 == "offline").unwrap().1;
    assert_eq!(off.bytes_sent, 0, "offline: no peer traffic");
    let e = max_err(
        &open(&r0.0, &r1.0),
        &softmax_plain(&scores, &mask, (b, h, l)),
    );
    assert!(e <= 5e-3, "softmax: {e:.2e}");
    let want: Vec<f64> = x
        .iter()
        .map(|&v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt())))
        .collect();
    assert!(max_err(&open(&r0.1, &r1.1), &want) <= 5e-4);
}

/// `⌊x / 2^d⌋` of a signed ring integer, computed apart from the protocol.
fn floor_shift(x: u64, d: u32) -> i64 {
    (x as i64) >> d
}

/// Share splits `x0 + x1 = x` on which SecureML's local truncation fails — `x0 ∈ [0, x)` for
/// `x ≥ 0`, `x0 ∈ [2^64 + x, 2^64)` for `x < 0` (the two shares' difference wraps) — and
/// splits near the exact protocol's own boundaries (`x0 + 2^62` or `−x1` at 0, 2^63, 2^64).
fn adversarial_splits(x: u64) -> (Vec<u64>, Vec<u64>) {
    let xi = x as i64;
    let mut bad: Vec<u64> = if xi > 0 {
        [0, 1, x / 2, x - 1]
            .into_iter()
            .filter(|&a| a < x)
            .collect()
    } else if xi < 0 {
        let m = xi.unsigned_abs();
        [0u64.wrapping_sub(m), 0u64.wrapping_sub(m / 2), u64::MAX]
            .into_iter()
            .filter(|&a| a != 0)
            .collect()
    } else {
        vec![]
    };
    bad.sort_unstable();
    bad.dedup();
    let mut edges = Vec::new();
    for base in [0u64, 1 << 62, 1 << 63, 3 << 62] {
        for k in [0u64, 1, 2, 65535, 65536] {
            edges.push(base.wrapping_add(k));
            edges.push(base.wrapping_sub(k));
            // x1 = −(base ± k): P1's negated share at the boundary.
            edges.push(x.wrapping_add(base).wrapping_add(k));
            edges.push(x.wrapping_add(base).wrapping_sub(k));
        }
    }
    (bad, edges)
}

/// SecureML's local truncation opens to garbage on adversarial share splits; the exact one
/// opens to `⌊x / 2^16⌋` or one more on every split (those, boundary splits and random ones),
/// for products of every magnitude up to the protocol's limit `|x| < 2^62`, over several
/// dealer seeds. One round, one bit per element each way.
#[test]
fn exact_truncation_is_right_where_local_truncation_fails() {
    let d = 16;
    let two32 = (1u64 << 32) as f64;
    let mut xs: Vec<u64> = [5.0, -5.0, 0.75, -0.75, 1000.25, -1000.25, 3.0e-4, -3.0e-4]
        .iter()
        .map(|v: &f64| ((v * two32).round() as i64) as u64)
        .collect();
    xs.extend([
        1u64,
        u64::MAX,
        (1 << 62) - 1,
        (-(1i64 << 62)) as u64,
        1 << 40,
    ]);
    let mut r = rng(40);
    let (mut x0, mut want, mut local_bad) = (Vec::new(), Vec::new(), Vec::new());
    for &x in &xs {
        let (bad, edges) = adversarial_splits(x);
        let random: Vec<u64> = (0..8).map(|_| r.next_u64()).collect();
        for (i, s) in bad.iter().chain(&edges).chain(&random).enumerate() {
            x0.push(*s);
            want.push(x);
            local_bad.push(i < bad.len());
        }
    }
    let n = x0.len();
    let x1: Vec<u64> = x0
        .iter()
        .zip(&want)
        .map(|(a, x)| x.wrapping_sub(*a))
        .collect();
    let s = [
        AShare::new(Party::P0, RingTensor::new(vec![n], x0.clone()).unwrap()),
        AShare::new(Party::P1, RingTensor::new(vec![n], x1.clone()).unwrap()),
    ];
    // Local: the adversarial splits are off by about 2^48 units (garbage), the others by ≤ 1.
    let local = AShare::reconstruct(&s[0].truncate(d), &s[1].truncate(d)).unwrap();
    let mut failures = 0;
    for i in 0..n {
        let err = (local.data[i] as i64).wrapping_sub(floor_shift(want[i], d));
        if local_bad[i] {
            assert!(
                err.unsigned_abs() > 1 << 40,
                "split {i}: local truncation did not fail"
            );
            failures += 1;
        }
    }
    assert!(failures >= 40, "{failures} adversarial splits");
    for _dealer in 0..3 {
        let (r0, r1) = two_party(|ctx| {
            ctx.op("trunc");
            let z = ctx.truncate_exact(pick(&s, ctx.party), d).unwrap();
            (z, ctx.net.stats.snapshot())
        });
        let got = AShare::reconstruct(&r0.0, &r1.0).unwrap();
        for (i, (&g, &x)) in got.data.iter().zip(&want).enumerate() {
            let err = (g as i64).wrapping_sub(floor_shift(x, d));
            assert!(err == 0 || err == 1, "split {i}: off by {err} units");
        }
        let st = &r0.1.iter().find(|x| x.0 == "trunc").unwrap().1;
        assert_eq!(st.rounds, 1);
        assert_eq!(
            st.bytes_sent,
            8 * (n.div_ceil(64) as u64 + 1),
            "one bit each + header"
        );
    }
    eprintln!(
        "exact truncation: {n} splits ({failures} where local truncation fails) all within one ulp"
    );
}

/// Random values of every magnitude below 2^62, random splits, several shifts in one round
/// (`truncate_exact_many`): `⌊x / 2^d⌋` or one more, and rounding up about as often as the
/// dropped fraction says (unbiased, as SecureML's).
#[test]
fn exact_truncation_many_shifts_in_one_round() {
    let mut r = rng(41);
    let n = 3000;
    let vals: Vec<u64> = (0..n)
        .map(|i| {
            let v = (r.next_u64() >> (2 + i % 62)) as i64;
            (if i % 2 == 0 { v } else { -v - 1 }) as u64
        })
        .collect();
    let t = RingTensor::new(vec![n], vals.clone()).unwrap();
    let s = shares_of(&t, 42);
    let shifts = [0u32, 1, 16, 32, 48, 62];
    let (r0, r1) = two_party(|ctx| {
        let x = pick(&s, ctx.party);
        let req: Vec<(&AShare, u32)> = shifts.iter().map(|&d| (x, d)).collect();
        let z = ctx.truncate_exact_many(&req).unwrap();
        assert!(
            ctx.truncate_exact(x, 63).is_err(),
            "2^(62−d) must be an integer"
        );
        (z, ctx.net.stats.total().rounds)
    });
    assert_eq!(r0.1, 1, "one round for all shifts");
    for (k, &d) in shifts.iter().enumerate() {
        let got = AShare::reconstruct(&r0.0[k], &r1.0[k]).unwrap();
        let (mut ups, mut frac) = (0.0, 0.0);
        for (i, (&g, &x)) in got.data.iter().zip(&vals).enumerate() {
            let err = (g as i64).wrapping_sub(floor_shift(x, d));
            assert!(err == 0 || err == 1, "d = {d}, element {i}: off by {err}");
            ups += err as f64;
            frac += if d == 0 {
                0.0
            } else {
                (x & ((1u64 << d) - 1)) as f64 / 2f64.powi(d as i32)
            };
        }
        if d == 0 {
            assert_eq!(got, t, "d = 0 is the identity");
        } else {
            // Binomial: within 5 standard deviations of the expected count.
            assert!(
                (ups - frac).abs() < 5.0 * (n as f64).sqrt() / 2.0,
                "d = {d}: {ups} vs {frac}"
            );
        }
    }
}
