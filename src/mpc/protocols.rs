//! Two-party protocols on additive shares, with the dealer's correlated randomness.
//!
//! [`Ctx`] holds one party's view: its channel to the peer (with counters), its side of the
//! dealer, and the fixed-point encoding. [`Ctx::run`] performs **one round**: any number of
//! independent products ([`Op`]) whose openings travel in a single frame each way, and whose
//! dealer requests travel in a single frame to the dealer while the parties exchange.
//!
//! Products (Beaver, one round each; outputs carry `2f` fractional bits until truncated):
//! - [`Op::Mul`]: `x ∘ y`; open `e = x − a`, `f = y − b`; `z_i = e∘y_i + a_i∘f + c_i`.
//! - [`Op::MulRow`]: `x[r, c] · y[r]` (a per-row factor), opening `y − b` once per row.
//! - [`Op::Square`]: `x²` from a square pair; `z_i = [i = 0]·e² + 2e∘a_i + c_i`.
//! - [`Op::MatMul`]: `x · y` with a matrix triple; `z_i = e·y_i + a_i·f + c_i`.
//! - [`Op::WeightMatMul`] / [`Op::WeightElem`]: `x · W` / `x ∘ W` for a weight `W` private to P0,
//!   masked once per model (see [`super::dealer`]); only P1 sends (`e = x1 − a`).
//!
//! Non-linear ops for the student, all built from those rounds and local truncation:
//! [`Ctx::quad`] (1 round), [`Ctx::reciprocal`] / [`Ctx::inv_sqrt`] (Newton–Raphson, range-aware
//! linear initial guess from [`NewtonPlan`]), [`Ctx::two_quad`], [`Ctx::layer_norm`],
//! [`Ctx::tanh`] (Chebyshev series, [`ChebPlan`]).

use super::dealer::{DealerClient, Material, Req, bit_words};
use super::net::Net;
use super::ring::{FixedPoint, PackedRhs, RingTensor, matmul_shape, matmul_u64_packed};
use super::share::{AShare, BShare};
use super::trunc::Truncation;
use super::{MpcError, Party, Result};

/// A weight private to P0 with its per-model mask opened to P1: P0 holds `W`, P1 holds
/// `F = W − B0`. Row-major; `[k, n]` for a matrix, `[n]` for a vector.
#[derive(Clone)]
pub struct PrivWeight {
    pub id: u64,
    pub data: RingTensor,
    /// A matrix's data packed for the ring matmul (once, at setup).
    pub packed: Option<std::sync::Arc<PackedRhs>>,
}

impl PrivWeight {
    /// `W` (P0) or `F` (P1) with its matrix form packed for products.
    pub fn new(id: u64, data: RingTensor) -> Self {
        let packed = match data.shape.as_slice() {
            [k, n] => Some(std::sync::Arc::new(PackedRhs::new(&data.data, *k, *n))),
            _ => None,
        };
        Self { id, data, packed }
    }

    /// `x · self` for `x` `[m, k]` (row-major words).
    fn matmul_words(&self, x: &[u64]) -> Result<Vec<u64>> {
        let p = self
            .packed
            .as_ref()
            .ok_or_else(|| shape_err("weight_matmul", &[x.len()], &self.data.shape))?;
        Ok(matmul_u64_packed(x, p, x.len() / p.k.max(1)))
    }
}

impl std::fmt::Debug for PrivWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PrivWeight {{ id: {}, shape: {:?} }}",
            self.id, self.data.shape
        )
    }
}

/// One product of a round.
pub enum Op<'a> {
    Mul(&'a AShare, &'a AShare),
    /// `x` of shape `[.., c]` (rows = numel / c), `y` with one element per row.
    MulRow(&'a AShare, &'a AShare),
    Square(&'a AShare),
    /// `[.., m, k] × [k, n]` or `[b, m, k] × [b, k, n]`.
    MatMul(&'a AShare, &'a AShare),
    /// `x · W`, `x` `[.., k]`, `W` `[k, n]`.
    WeightMatMul(&'a AShare, &'a PrivWeight),
    /// `x ∘ W`, `x` `[.., c]`, `W` `[c]` broadcast over rows.
    WeightElem(&'a AShare, &'a PrivWeight),
    /// `x & y` of XOR-shared words (AND triple); the result's words are a binary share
    /// (returned in an [`AShare`] of shape `[words]`, see [`Ctx::and`]).
    And(&'a BShare, &'a BShare),
    /// `x0 & x1` where P0 passes its own words `x0` and P1 its own `x1` (each known to one
    /// party; owned AND triple): each party opens only its operand, one word per word.
    AndOwned(&'a BShare),
    /// B2A of `n` packed bits (XOR-shared): the bits as additively shared ring integers 0/1,
    /// with the dealer's shared random bits (open `b ⊕ r`, then `b = c + r − 2cr`).
    B2A(&'a BShare, usize),
    /// `2·p·q` as additively shared ring integers for `n` packed bits `p` known to P0 alone and
    /// `q` known to P1 alone (each party passes its own), from the same shared random bits as
    /// [`Op::B2A`]: one bit per element each way. The doubled product is what comes out cheaply
    /// (see [`super::trunc`]); the exact truncation only needs it times a power of two.
    OwnedBitAnd(&'a BShare, usize),
}

fn shape_err(op: &str, lhs: &[usize], rhs: &[usize]) -> MpcError {
    MpcError::Shape {
        op: op.into(),
        lhs: lhs.to_vec(),
        rhs: rhs.to_vec(),
    }
}

impl Op<'_> {
    fn req(&self) -> Result<Req> {
        Ok(match self {
            Op::Mul(x, y) => {
                if x.shape() != y.shape() {
                    return Err(shape_err("mul", x.shape(), y.shape()));
                }
                Req::Mul { n: x.numel() }
            }
            Op::MulRow(x, y) => {
                let cols = *x.shape().last().unwrap_or(&1);
                let rows = x.numel() / cols.max(1);
                if y.numel() != rows {
                    return Err(shape_err("mul_row", x.shape(), y.shape()));
                }
                Req::MulRow { rows, cols }
            }
            Op::Square(x) => Req::Square { n: x.numel() },
            Op::MatMul(x, y) => {
                matmul_shape(x.shape(), y.shape())?;
                let (xs, ys) = (x.shape(), y.shape());
                if ys.len() == 3 {
                    Req::MatMul {
                        batch: xs[0],
                        m: xs[1],
                        k: xs[2],
                        n: ys[2],
                    }
                } else {
                    let k = ys[0];
                    Req::MatMul {
                        batch: 0,
                        m: x.numel() / k.max(1),
                        k,
                        n: ys[1],
                    }
                }
            }
            Op::WeightMatMul(x, w) => {
                let ws = &w.data.shape;
                if ws.len() != 2 || x.shape().last() != Some(&ws[0]) {
                    return Err(shape_err("weight_matmul", x.shape(), ws));
                }
                Req::WeightMatMul {
                    id: w.id,
                    m: x.numel() / ws[0].max(1),
                    k: ws[0],
                    n: ws[1],
                }
            }
            Op::WeightElem(x, w) => {
                let ws = &w.data.shape;
                if ws.len() != 1 || x.shape().last() != Some(&ws[0]) {
                    return Err(shape_err("weight_elem", x.shape(), ws));
                }
                Req::WeightElem {
                    id: w.id,
                    rows: x.numel() / ws[0].max(1),
                    cols: ws[0],
                }
            }
            Op::And(x, y) => {
                if x.len() != y.len() {
                    return Err(shape_err("and", &[x.len()], &[y.len()]));
                }
                Req::And { n: x.len() }
            }
            Op::AndOwned(x) => Req::AndOwned { n: x.len() },
            Op::B2A(x, n) | Op::OwnedBitAnd(x, n) => {
                if x.len() != bit_words(*n) {
                    return Err(shape_err("b2a", &[x.len()], &[*n]));
                }
                Req::Bits { n: *n }
            }
        })
    }

    /// Shape of the op's output.
    fn out_shape(&self) -> Result<Vec<usize>> {
        match self {
            Op::Mul(x, _) | Op::MulRow(x, _) | Op::Square(x) | Op::WeightElem(x, _) => {
                Ok(x.shape().to_vec())
            }
            Op::MatMul(x, y) => matmul_shape(x.shape(), y.shape()),
            Op::WeightMatMul(x, w) => matmul_shape(x.shape(), &w.data.shape),
            Op::And(x, _) | Op::AndOwned(x) => Ok(vec![x.len()]),
            Op::B2A(_, n) | Op::OwnedBitAnd(_, n) => Ok(vec![*n]),
        }
    }

    /// Words `party` sends for this op.
    fn send_len(&self, party: Party) -> usize {
        match self {
            Op::Mul(x, y) => x.numel() + y.numel(),
            Op::MulRow(x, y) => x.numel() + y.numel(),
            Op::Square(x) => x.numel(),
            Op::MatMul(x, y) => x.numel() + y.numel(),
            Op::WeightMatMul(x, _) | Op::WeightElem(x, _) => match party {
                Party::P0 => 0,
                Party::P1 => x.numel(),
            },
            Op::And(x, y) => x.len() + y.len(),
            Op::AndOwned(x) => x.len(),
            Op::B2A(x, _) | Op::OwnedBitAnd(x, _) => x.len(),
        }
    }
}

/// One party's share of `2·p·q` for P0's bit `p` and P1's bit `q`, given the opened
/// `u = p ⊕ r0`, `v = q ⊕ r1` and this party's shares of the dealer's random bit
/// `r = r0 ⊕ r1 = R0 + R1` (`own_bit` is `p` at P0, `q` at P1; `r_bin`, `r_arith` its `r_i`,
/// `R_i`). Over the integers `q = v + (1 − 2v)·r1` and `p·r1 = u·r1 + (1 − 2u)·r0·r1`, and
/// `2·r0·r1 = r0 + r1 − r`, so
/// `2pq = 2p·v + (1 − 2v)·(2u·r1 + (1 − 2u)·(r0 + r1 − r))`: P0 takes the terms in `p` and
/// `r0 − R0`, P1 those in `r1 − R1`. Only `2·r0·r1` has shares, not `r0·r1` (no halving in
/// Z_2^64), hence the factor 2.
fn owned_bit_and_share(
    party: Party,
    own_bit: u64,
    u: u64,
    v: u64,
    r_bin: u64,
    r_arith: u64,
) -> u64 {
    let sign = |b: u64, t: u64| if b == 1 { t.wrapping_neg() } else { t };
    let cross = r_bin.wrapping_sub(r_arith); // r_i − R_i
    match party {
        Party::P0 => (2 * own_bit * v).wrapping_add(sign(v, sign(u, cross))),
        Party::P1 => sign(v, (2 * u * r_bin).wrapping_add(sign(u, cross))),
    }
}

fn xor_into(out: &mut Vec<u64>, x: &[u64], a: &[u64]) {
    out.extend(x.iter().zip(a).map(|(p, q)| p ^ q));
}

fn xor_vec(x: &[u64], y: &[u64]) -> Vec<u64> {
    x.iter().zip(y).map(|(p, q)| p ^ q).collect()
}

fn sub_into(out: &mut Vec<u64>, x: &[u64], a: &[u64]) {
    out.extend(x.iter().zip(a).map(|(p, q)| p.wrapping_sub(*q)));
}

fn add_vec(x: &[u64], y: &[u64]) -> Vec<u64> {
    x.iter().zip(y).map(|(p, q)| p.wrapping_add(*q)).collect()
}

/// Correlated randomness of one round, prepared offline ([`Ctx::begin_offline`]): the
/// dealer's requests (checked against the online round), this party's material, and for P1
/// the weight products that depend only on it (`a·F + c1`, `a∘F + c1`).
struct PreRound {
    /// Its requests went to the dealer (offline pipelining).
    sent: bool,
    answered: bool,
    reqs: Vec<Req>,
    mats: Vec<Material>,
    weight_out: Vec<Option<Vec<u64>>>,
}

/// One party's protocol context.
pub struct Ctx {
    pub party: Party,
    pub fp: FixedPoint,
    /// How the hot spots truncate (both parties must agree: it changes the rounds).
    pub truncation: Truncation,
    pub net: Net,
    pub dealer: DealerClient,
    /// Offline (preprocessing) pass in progress: rounds prepare material instead of running.
    recording: bool,
    pre: std::collections::VecDeque<PreRound>,
    /// Offline: frames of requests sent to the dealer whose answers are not read yet, oldest
    /// first — the `pre` indices of each frame and its requests.
    inflight: std::collections::VecDeque<(Vec<usize>, Vec<Req>)>,
    /// Wall time of the encoder layers (no embedding, pooler or classifier), online and in
    /// the offline pass, summed over forward passes.
    pub encoder_s: f64,
    pub encoder_offline_s: f64,
    /// `(id, shape)` of every weight shared so far (for [`Ctx::warm_dealer`]).
    weights: Vec<(u64, Vec<usize>)>,
}

impl Ctx {
    pub fn new(fp: FixedPoint, net: Net, dealer: DealerClient) -> Self {
        Self {
            party: dealer.party(),
            fp,
            truncation: Truncation::default(),
            net,
            dealer,
            recording: false,
            pre: std::collections::VecDeque::new(),
            inflight: std::collections::VecDeque::new(),
            encoder_s: 0.0,
            encoder_offline_s: 0.0,
            weights: Vec::new(),
        }
    }

    /// End of the once-per-model setup: P1 asks the dealer for a zero-row product with every
    /// weight shared so far (nothing is drawn, nothing comes back), so the dealer expands and
    /// keeps each weight's mask `B0` now instead of during the first inference.
    pub fn warm_dealer(&mut self) -> Result<()> {
        let reqs: Vec<Req> = self
            .weights
            .iter()
            .map(|(id, s)| match s.as_slice() {
                [k, n] => Req::WeightMatMul {
                    id: *id,
                    m: 0,
                    k: *k,
                    n: *n,
                },
                _ => Req::WeightElem {
                    id: *id,
                    rows: 0,
                    cols: s.iter().product(),
                },
            })
            .collect();
        if reqs.is_empty() {
            return Ok(());
        }
        let label = self.net.stats.label().to_string();
        let mut mats = vec![Material::default(); reqs.len()];
        let sent = self.dealer.request(&label, &reqs)?;
        let got = self.dealer.receive(&label, &reqs, &mut mats)?;
        self.net.stats.cur().dealer_bytes += sent + got;
        Ok(())
    }

    /// Starts the offline phase: until [`Ctx::end_offline`], every round draws its material,
    /// gets the dealer's answers (P1) and computes P1's weight products, stores them for the
    /// online round with the same requests, and returns zero shares of the right shapes
    /// without talking to the peer. Run the forward pass on dummy inputs of the online shape
    /// in between (the requests depend on shapes only).
    pub fn begin_offline(&mut self) {
        self.recording = true;
    }

    /// Ends the offline phase: P1 sends the dealer every request of the pass in **one** frame
    /// and gets every `c1` back in one frame (charged to the current label, with the bytes).
    /// The next rounds consume the prepared material in order.
    pub fn end_offline(&mut self) -> Result<()> {
        self.fetch_offline()?;
        self.recording = false;
        Ok(())
    }

    /// During the offline phase: gets the dealer's answers for every round prepared so far, so
    /// the dealer's work can be timed with a part of the model.
    pub fn fetch_offline(&mut self) -> Result<()> {
        self.send_offline()?;
        let frames = self.inflight.len();
        self.receive_offline(frames)
    }

    /// During the offline phase: sends the dealer the requests of the rounds recorded since the
    /// last call (one frame) and reads the answers of the frames sent **before** it, so the
    /// dealer computes its part of one layer (`a·B0`, the bulk of its work) while this party
    /// records the next (P1's `a·F`): the two halves of every weight product run on both cores.
    pub fn pipeline_offline(&mut self) -> Result<()> {
        let older = self.inflight.len();
        self.send_offline()?;
        self.receive_offline(older)
    }

    fn send_offline(&mut self) -> Result<()> {
        let idx: Vec<usize> = (0..self.pre.len())
            .filter(|&i| !self.pre[i].answered && !self.pre[i].sent)
            .collect();
        if idx.is_empty() {
            return Ok(());
        }
        let reqs: Vec<Req> = idx
            .iter()
            .flat_map(|&i| self.pre[i].reqs.iter().cloned())
            .collect();
        let label = self.net.stats.label().to_string();
        let sent = self.dealer.request(&label, &reqs)?;
        self.net.stats.cur().dealer_bytes += sent;
        for &i in &idx {
            self.pre[i].sent = true;
        }
        self.inflight.push_back((idx, reqs));
        Ok(())
    }

    /// Reads the answers of the `frames` oldest frames in flight.
    fn receive_offline(&mut self, frames: usize) -> Result<()> {
        let label = self.net.stats.label().to_string();
        for _ in 0..frames {
            let Some((idx, reqs)) = self.inflight.pop_front() else {
                break;
            };
            let mut mats: Vec<Material> = vec![Material::default(); reqs.len()];
            let got = self.dealer.receive(&label, &reqs, &mut mats)?;
            self.net.stats.cur().dealer_bytes += got;
            // P0's `c` comes from its own PRG (already drawn); nothing crossed.
            let mut answers = mats.into_iter();
            for &i in &idx {
                let p = &mut self.pre[i];
                if self.party == Party::P1 {
                    for (m, z) in p.mats.iter_mut().zip(p.weight_out.iter_mut()) {
                        let c = answers.next().map(|a| a.c).unwrap_or_default();
                        if let Some(z) = z {
                            for (v, ci) in z.iter_mut().zip(&c) {
                                *v = v.wrapping_add(*ci);
                            }
                        }
                        m.c = c;
                    }
                }
                p.answered = true;
            }
        }
        Ok(())
    }

    /// Whether an offline pass is in progress (rounds are not executed).
    pub fn is_offline(&self) -> bool {
        self.recording
    }

    /// Rounds of prepared material not yet used.
    pub fn prepared_rounds(&self) -> usize {
        self.pre.len()
    }

    fn record(&mut self, ops: &[Op], reqs: Vec<Req>) -> Result<Vec<AShare>> {
        let party = self.party;
        let mats = self.dealer.draw(&reqs);
        // P1's products with F (`c1` is added when the dealer's answers arrive).
        let weight_out: Vec<Option<Vec<u64>>> = ops
            .iter()
            .zip(&mats)
            .map(|(op, m)| -> Result<Option<Vec<u64>>> {
                Ok(match (party, op) {
                    (Party::P1, Op::WeightMatMul(_, w)) => Some(w.matmul_words(&m.a)?),
                    (Party::P1, Op::WeightElem(_, w)) => {
                        let cols = w.data.numel();
                        Some(
                            m.a.iter()
                                .enumerate()
                                .map(|(i, &v)| v.wrapping_mul(w.data.data[i % cols]))
                                .collect(),
                        )
                    }
                    _ => None,
                })
            })
            .collect::<Result<_>>()?;
        self.pre.push_back(PreRound {
            sent: false,
            answered: false,
            reqs,
            mats,
            weight_out,
        });
        ops.iter()
            .map(|op| {
                let shape = op.out_shape()?;
                Ok(AShare::new(party, RingTensor::zeros(&shape)))
            })
            .collect()
    }

    /// Fractional bits.
    pub fn f(&self) -> u32 {
        self.fp.frac_bits()
    }

    /// Charges what follows to op `label` (rounds, bytes, dealer bytes, wall time).
    pub fn op(&mut self, label: &str) {
        if self.recording {
            return; // the offline pass is charged to its own label
        }
        self.net.stats.begin(label);
    }

    /// Encodes a public real.
    pub fn enc(&self, v: f64) -> u64 {
        self.fp.encode(v)
    }

    /// One round: every op's opening in one frame each way. Outputs are **not** truncated.
    pub fn run(&mut self, ops: &[Op]) -> Result<Vec<AShare>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let party = self.party;
        let label = self.net.stats.label().to_string();
        let reqs: Vec<Req> = ops.iter().map(Op::req).collect::<Result<_>>()?;
        if self.recording {
            return self.record(ops, reqs);
        }
        let pre = match self.pre.pop_front() {
            Some(p) if p.reqs == reqs && p.answered => Some(p),
            Some(_) => {
                return Err(MpcError::Dealer(format!(
                    "op {label}: the online round does not match the offline material"
                )));
            }
            None => None,
        };
        let (mut mats, weight_out, sent_to_dealer) = match pre {
            Some(p) => (p.mats, p.weight_out, None),
            None => {
                let mats = self.dealer.draw(&reqs);
                let sent = self.dealer.request(&label, &reqs)?;
                (mats, vec![None; ops.len()], Some(sent))
            }
        };
        // My part of every opening.
        let mut out = Vec::with_capacity(ops.iter().map(|o| o.send_len(party)).sum());
        for (op, m) in ops.iter().zip(&mats) {
            match op {
                Op::Mul(x, y) | Op::MulRow(x, y) | Op::MatMul(x, y) => {
                    sub_into(&mut out, &x.t.data, &m.a);
                    sub_into(&mut out, &y.t.data, &m.b);
                }
                Op::Square(x) => sub_into(&mut out, &x.t.data, &m.a),
                Op::WeightMatMul(x, _) | Op::WeightElem(x, _) => {
                    if party == Party::P1 {
                        sub_into(&mut out, &x.t.data, &m.a);
                    }
                }
                Op::And(x, y) => {
                    xor_into(&mut out, &x.words, &m.a);
                    xor_into(&mut out, &y.words, &m.b);
                }
                Op::AndOwned(x) => match party {
                    Party::P0 => xor_into(&mut out, &x.words, &m.a),
                    Party::P1 => xor_into(&mut out, &x.words, &m.b),
                },
                Op::B2A(x, _) | Op::OwnedBitAnd(x, _) => xor_into(&mut out, &x.words, &m.a),
            }
        }
        // The peer's frame length is known from the ops: checked on its header, before any
        // allocation.
        let want: usize = ops.iter().map(|o| o.send_len(party.peer())).sum();
        let peer = self.net.exchange_exact(&out, want)?;
        if let Some(sent) = sent_to_dealer {
            let got_from_dealer = self.dealer.receive(&label, &reqs, &mut mats)?;
            self.net.stats.cur().dealer_bytes += sent + got_from_dealer;
        }

        let (mut pm, mut pp) = (0usize, 0usize);
        let mut res = Vec::with_capacity(ops.len());
        for ((op, m), wo) in ops.iter().zip(&mats).zip(weight_out) {
            let (nm, np) = (op.send_len(party), op.send_len(party.peer()));
            let mine = &out[pm..pm + nm];
            let theirs = &peer[pp..pp + np];
            pm += nm;
            pp += np;
            res.push(match wo {
                Some(z) => AShare::new(party, RingTensor::new(op.out_shape()?, z)?),
                None => self.finish(op, m, mine, theirs)?,
            });
        }
        Ok(res)
    }

    fn finish(&self, op: &Op, m: &Material, mine: &[u64], theirs: &[u64]) -> Result<AShare> {
        let o = Opened {
            party: self.party,
            m,
            mine,
            theirs,
        };
        match op {
            Op::Mul(x, y) => o.mul(x, y),
            Op::MulRow(x, y) => o.mul_row(x, y),
            Op::Square(x) => o.square(x),
            Op::MatMul(x, y) => o.matmul(x, y),
            Op::WeightMatMul(x, w) => o.weight_matmul(x, w),
            Op::WeightElem(x, w) => o.weight_elem(x, w),
            Op::And(x, _) => o.and(x),
            Op::AndOwned(x) => o.and_owned(x),
            Op::B2A(_, n) => o.b2a(n),
            Op::OwnedBitAnd(x, n) => o.owned_bit_and(x, n),
        }
    }

    /// Runs one op of a round and truncates by `f`.
    fn one(&mut self, op: Op) -> Result<AShare> {
        let f = self.f();
        Ok(self.run(&[op])?.remove(0).truncate(f))
    }

    /// `x ∘ y`, truncated (1 round).
    pub fn mul(&mut self, x: &AShare, y: &AShare) -> Result<AShare> {
        self.one(Op::Mul(x, y))
    }

    /// `x²`, truncated (1 round).
    pub fn square(&mut self, x: &AShare) -> Result<AShare> {
        self.one(Op::Square(x))
    }

    /// `x · y`, truncated (1 round).
    pub fn matmul(&mut self, x: &AShare, y: &AShare) -> Result<AShare> {
        self.one(Op::MatMul(x, y))
    }

    /// `x · W + bias` for P0's weight `W` `[k, n]` and bias `[n]` (`bias` is P0's; P1 passes
    /// `None`). `trunc` is the truncation of the product: `f` for fixed-point inputs, 0 for
    /// integer inputs (one-hot rows); a hot spot ([`Ctx::truncate_hot`]).
    pub fn linear(
        &mut self,
        x: &AShare,
        w: &PrivWeight,
        bias: Option<&RingTensor>,
        trunc: u32,
    ) -> Result<AShare> {
        let z = self.run(&[Op::WeightMatMul(x, w)])?.remove(0);
        // One value per token and output feature: a hot spot.
        let mut z = self.truncate_hot(&z, trunc)?;
        if self.recording {
            // Offline: the dealer computes this product's half while P1 records the next one.
            self.pipeline_offline()?;
        }
        if let (Party::P0, Some(b)) = (self.party, bias) {
            add_row_vector(&mut z.t, b)?;
        }
        Ok(z)
    }

    /// Opens `x` to both parties (1 round).
    pub fn reveal(&mut self, x: &AShare) -> Result<RingTensor> {
        if self.recording {
            return Ok(RingTensor::zeros(x.shape()));
        }
        let theirs = self.net.exchange_exact(&x.t.data, x.numel())?;
        RingTensor::new(x.shape().to_vec(), add_vec(&x.t.data, &theirs))
    }

    /// Opens `x` to `to` only (1 round, one direction): `Some(x)` there, `None` at the other.
    pub fn reveal_to(&mut self, x: &AShare, to: Party) -> Result<Option<RingTensor>> {
        if self.recording {
            return Ok((self.party == to).then(|| RingTensor::zeros(x.shape())));
        }
        if self.party == to {
            let theirs = self.net.recv_exact(x.numel())?;
            Ok(Some(RingTensor::new(
                x.shape().to_vec(),
                add_vec(&x.t.data, &theirs),
            )?))
        } else {
            self.net.send(&x.t.data)?;
            Ok(None)
        }
    }

    /// Setup of one P0 weight (once per model): P0 sends `F = W − B0(id)` to P1. P0 passes
    /// `Some(W)`; P1 passes `None` and the shape.
    pub fn share_weight(
        &mut self,
        id: u64,
        w: Option<&RingTensor>,
        shape: &[usize],
    ) -> Result<PrivWeight> {
        let n: usize = shape.iter().product();
        self.weights.push((id, shape.to_vec()));
        match self.party {
            Party::P0 => {
                let w = w.ok_or_else(|| MpcError::Config("P0 must hold the weights".into()))?;
                if w.shape != shape {
                    return Err(shape_err("share_weight", &w.shape, shape));
                }
                let b0 = self.dealer.weight_mask(id, n).expect("P0 knows its masks");
                let f: Vec<u64> = w
                    .data
                    .iter()
                    .zip(&b0)
                    .map(|(x, b)| x.wrapping_sub(*b))
                    .collect();
                self.net.send(&f)?;
                Ok(PrivWeight::new(id, w.clone()))
            }
            Party::P1 => {
                let f = self.net.recv_exact(n)?;
                Ok(PrivWeight::new(id, RingTensor::new(shape.to_vec(), f)?))
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Non-linear ops.
    // -----------------------------------------------------------------------------------------

    /// `a·x² + b·x + c` (MPCFormer's Quad: 0.125, 0.25, 0.5) in **one round**, as
    /// `a·(x + h)² + k` with `h = b / 2a`, `k = c − b² / 4a` (the same polynomial). When `a`
    /// is a power of two (0.125 = 2⁻³) the square is truncated once, by `f + 3`.
    pub fn quad(&mut self, x: &AShare, a: f64, b: f64, c: f64) -> Result<AShare> {
        let f = self.f();
        if a == 0.0 {
            let y = x.mul_public_int(1).t.mul_public_int(self.enc(b) as i64);
            return Ok(AShare::new(self.party, y)
                .truncate(f)
                .add_const(self.enc(c)));
        }
        let (h, k) = (b / (2.0 * a), c - b * b / (4.0 * a));
        let t = x.add_const(self.enc(h));
        let sq = self.run(&[Op::Square(&t)])?.remove(0);
        let log = a.abs().log2();
        // A square per FFN activation: a hot spot.
        let y = if a > 0.0 && log.fract() == 0.0 && log <= 0.0 && (f as f64 - log) < 63.0 {
            self.truncate_hot(&sq, f + (-log) as u32)?
        } else {
            let s = self.truncate_hot(&sq, f)?;
            let s = AShare::new(self.party, s.t.mul_public_int(self.enc(a) as i64));
            self.truncate_hot(&s, f)?
        };
        Ok(y.add_const(self.enc(k)))
    }

    /// `≈ 1/u` for `u = z / 2^plan.shift`, i.e. `2^shift / z` (f fractional bits), by
    /// Newton–Raphson in Goldschmidt form from the linear guess `w0 = α − β·u`:
    /// `ε0 = 1 − u·w0` (1 round), then `w ← w·(1 + ε)`, `ε ← ε²` (1 round each, the two products
    /// in one frame). `1 + plan.iters` rounds. See [`NewtonPlan`] for the range and error.
    pub fn reciprocal(&mut self, z: &AShare, plan: &NewtonPlan) -> Result<AShare> {
        let f = self.f();
        // u carries RECIP_EXTRA_BITS more fractional bits (u·2^g at f bits): the products with
        // u are truncated by f + g, keeping their value (and failure probability) small.
        let g = RECIP_EXTRA_BITS.min(plan.shift);
        let ug = z.truncate(plan.shift - g);
        let bu = AShare::new(self.party, ug.t.mul_public_int(self.enc(plan.beta) as i64))
            .truncate(f + g);
        let mut w = bu.rsub_const(self.enc(plan.alpha));
        let one = self.fp.one();
        let uw = self.run(&[Op::Mul(&ug, &w)])?.remove(0).truncate(f + g);
        let mut eps = uw.rsub_const(one);
        for i in 0..plan.iters {
            if i + 1 == plan.iters {
                let we = self.mul(&w, &eps)?;
                w = w.add(&we)?;
            } else {
                let r = self.run(&[Op::Mul(&w, &eps), Op::Square(&eps)])?;
                w = w.add(&r[0].truncate(f))?;
                eps = r[1].truncate(f);
            }
        }
        Ok(w)
    }

    /// `≈ 1/√v` (f fractional bits) by Newton–Raphson `w ← w·(3 − v·w²)/2` from the linear
    /// guess `w0 = α − β·v`, tracking `h = v·w²` as `h ← h·t²` with `t = (3 − h)/2` so every
    /// product stays O(1) (no overflow, no lost bits): `h0 = (v·w0)·w0` (2 rounds), then per
    /// step `{w·t, t²}` (1 round) and `h·t²` (1 round; not needed after the last step):
    /// `2·iters + 1` rounds. See [`NewtonPlan`].
    pub fn inv_sqrt(&mut self, v: &AShare, plan: &NewtonPlan) -> Result<AShare> {
        let f = self.f();
        // β is tiny for a wide range (6.7·10⁻⁶ over [0.23, 7520]) and would encode as 0 at f
        // bits, leaving a constant guess from which Newton diverges for large v; it is encoded
        // with `e` extra bits instead (kept ≥ 16 significant bits, the product below 2^52·hi).
        let e = beta_extra_bits(plan.beta, plan.hi, f);
        let beta = (plan.beta * 2f64.powi((f + e) as i32)).round() as i64;
        let bv = AShare::new(self.party, v.t.mul_public_int(beta)).truncate(f + e);
        let mut w = bv.rsub_const(self.enc(plan.alpha));
        if plan.iters == 0 {
            return Ok(w);
        }
        let vw = self.mul(v, &w)?;
        let mut h = self.mul(&vw, &w)?;
        let three = self.enc(3.0);
        for i in 0..plan.iters {
            let t3 = h.rsub_const(three); // 2t
            if i + 1 == plan.iters {
                w = self.run(&[Op::Mul(&w, &t3)])?.remove(0).truncate(f + 1);
            } else {
                let r = self.run(&[Op::Mul(&w, &t3), Op::Square(&t3)])?;
                w = r[0].truncate(f + 1);
                let t2 = r[1].truncate(f + 2);
                h = self.mul(&h, &t2)?;
            }
        }
        Ok(w)
    }

    /// 2Quad attention weights: `(s + c)²·m / Σ_k (s + c)²·m` for scores `s` `[B, H, Lq, Lk]`
    /// and the public 0/1 key mask `m` `[B, Lk]`, applied multiplicatively **after** squaring
    /// (masked keys get exactly 0). Row sums are summed before truncating; the reciprocal works
    /// on `u = Z / 2^shift` and the final product is split as `(E / 2^a)·(w / 2^(shift − a))`
    /// so that its value (the probability) stays ≤ 1 and keeps its bits. The mask is applied
    /// again after the last product, so padded keys contribute exactly 0 to `P·V`. The squares
    /// and their row sums are truncated together at a hot spot ([`Ctx::truncate_hot`]: one
    /// round more when exact).
    pub fn two_quad(
        &mut self,
        scores: &AShare,
        key_mask: &[u64],
        c: f64,
        plan: &NewtonPlan,
    ) -> Result<AShare> {
        let f = self.f();
        let s = scores.shape().to_vec();
        if s.len() != 4 || key_mask.len() != s[0] * s[3] {
            return Err(shape_err("2quad", &s, &[key_mask.len()]));
        }
        let (b, h, lq, lk) = (s[0], s[1], s[2], s[3]);
        let mask_full: Vec<u64> = (0..b * h * lq * lk)
            .map(|i| key_mask[(i / (h * lq * lk)) * lk + i % lk])
            .collect();
        let mask_full = RingTensor::new(s.clone(), mask_full)?;
        // (s + c)/2^k: every square, and every row sum truncated at 2f bits, is 4^k times
        // smaller, and so is its chance of a truncation failure (|X|/2^64; ~10⁸ squares on one
        // RTE dev pass of MiniLM made 1–2 failures with k = 0). The ratio is unchanged.
        let t = scores.add_const(self.enc(c)).truncate(plan.input_shift);
        let sq = self
            .run(&[Op::Square(&t)])?
            .remove(0)
            .mul_public(&mask_full)?;
        let rows = b * h * lq;
        let z: Vec<u64> =
            sq.t.data
                .chunks(lk)
                .map(|r| r.iter().fold(0u64, |acc, v| acc.wrapping_add(*v)))
                .collect();
        let z = AShare::new(self.party, RingTensor::new(vec![rows], z)?);
        let a_bits = plan.shift / 2;
        // Both are squares at 2f bits, one per score: the student's most truncated values.
        let mut zt = self.truncate_hot_many(&[(&z, f), (&sq, f + a_bits)])?;
        let (z, e) = (zt.remove(0), zt.remove(0).reshape(&[rows, lk])?);
        let w = self.reciprocal(&z, plan)?;
        let w = w.truncate(plan.shift - a_bits);
        let p = self.run(&[Op::MulRow(&e, &w)])?.remove(0).truncate(f);
        p.reshape(&s)?.mul_public(&mask_full)
    }

    /// LayerNorm over the last dimension of `x` `[rows, d]`: `(x − μ)/√(σ² + eps)·γ + β`.
    ///
    /// `μ` locally; then one round for both `(x − μ)²` (summed per row at 2f bits, truncated
    /// once) and `(x − μ)∘γ` (P0's γ, per-model mask); `σ² + eps` by one public product;
    /// [`Ctx::inv_sqrt`]; one row-broadcast product; P0 adds β. The row sums with `(x − μ)∘γ`,
    /// then the variance, are hot-spot truncations ([`Ctx::truncate_hot`]: two rounds more when
    /// exact).
    ///
    /// With `plan.input_shift = k > 0` (rows of large variance, e.g. MiniLM's outlier
    /// dimensions: σ² up to 1880), `x − μ` is divided by `2^k` before squaring and `eps` by
    /// `4^k` — LayerNorm is invariant to that scale, the output's product is truncated by
    /// `f + k` to undo it. The row sum truncated at 2f bits is `4^k` times smaller, and so is
    /// its chance of a truncation failure (`|X|/2^64`: 1.7·10⁻⁴ per row at σ² = 1880, d = 384).
    pub fn layer_norm(
        &mut self,
        x: &AShare,
        gamma: &PrivWeight,
        beta: Option<&RingTensor>,
        eps: f64,
        plan: &NewtonPlan,
    ) -> Result<AShare> {
        let f = self.f();
        let shape = x.shape().to_vec();
        let d = *shape.last().unwrap_or(&1);
        let rows = x.numel() / d.max(1);
        let inv_d = self.enc(1.0 / d as f64);
        let row_sum = |t: &RingTensor| -> Vec<u64> {
            t.data
                .chunks(d)
                .map(|r| r.iter().fold(0u64, |acc, v| acc.wrapping_add(*v)))
                .collect()
        };
        let sums = RingTensor::new(vec![rows], row_sum(&x.t))?;
        let mu = AShare::new(self.party, sums.mul_public_int(inv_d as i64)).truncate(f);
        let centered: Vec<u64> =
            x.t.data
                .iter()
                .enumerate()
                .map(|(i, v)| v.wrapping_sub(mu.t.data[i / d]))
                .collect();
        let dx = AShare::new(self.party, RingTensor::new(shape.clone(), centered)?);
        let k = plan.input_shift;
        let dxs = dx.truncate(k);
        let r = self.run(&[Op::Square(&dxs), Op::WeightElem(&dx, gamma)])?;
        let s = AShare::new(self.party, RingTensor::new(vec![rows], row_sum(&r[0].t))?);
        // Row sums of d squares and d products with γ: as many truncated values as the input.
        let mut sg = self.truncate_hot_many(&[(&s, f), (&r[1], f)])?;
        let (s, g) = (sg.remove(0), sg.remove(0));
        let var = AShare::new(self.party, s.t.mul_public_int(inv_d as i64));
        let var = self
            .truncate_hot(&var, f)?
            .add_const(self.enc(eps / 4f64.powi(k as i32)));
        let w = self.inv_sqrt(&var, plan)?;
        let y = self.run(&[Op::MulRow(&g, &w)])?.remove(0);
        let mut y = self.truncate_hot(&y, f + k)?;
        if let (Party::P0, Some(b)) = (self.party, beta) {
            add_row_vector(&mut y.t, b)?;
        }
        Ok(y)
    }

    /// `tanh(x)` by its Chebyshev series on `[−M, M]` ([`ChebPlan`]): `t = x/M`, `T_1 = t`,
    /// `T_{a+b} = 2·T_a·T_b − T_{a−b}` with `a` the largest power of two below the degree, so
    /// round `r` makes `T_{2^(r−1)+1} … T_{2^r}` from earlier ones (⌈log2 n⌉ rounds; every
    /// `|T_k| ≤ 1` on the range); then `Σ c_k T_k` locally, truncated once.
    pub fn tanh(&mut self, x: &AShare, plan: &ChebPlan) -> Result<AShare> {
        let f = self.f();
        let n = plan.coeffs.len().saturating_sub(1);
        let t = AShare::new(
            self.party,
            x.t.mul_public_int(self.enc(1.0 / plan.range) as i64),
        )
        .truncate(f);
        let mut tk: Vec<AShare> = Vec::with_capacity(n + 1);
        tk.push(AShare::from_public(
            self.party,
            &RingTensor::new(x.shape().to_vec(), vec![self.fp.one(); x.numel()])?,
        ));
        tk.push(t);
        let mut have = 1;
        while have < n {
            let a = have; // a power of two
            let top = (2 * a).min(n);
            let idx: Vec<usize> = (a + 1..=top).collect();
            let r = {
                let ops: Vec<Op> = idx.iter().map(|&k| Op::Mul(&tk[a], &tk[k - a])).collect();
                self.run(&ops)?
            };
            for (j, &k) in idx.iter().enumerate() {
                let prod = r[j].truncate(f).mul_public_int(2);
                let tkk = prod.sub(&tk[2 * a - k])?;
                tk.push(tkk);
            }
            have = top;
        }
        let mut acc = RingTensor::zeros(x.shape());
        for (k, &c) in plan.coeffs.iter().enumerate().skip(1) {
            if c.abs() < 1e-12 {
                continue;
            }
            acc.add_assign(&tk[k].t.mul_public_int(self.enc(c) as i64))?;
        }
        Ok(AShare::new(self.party, acc)
            .truncate(f)
            .add_const(self.enc(plan.coeffs[0])))
    }
}

/// Extra fractional bits for the public slope `β` of a linear initial guess: enough for 16
/// significant bits, as long as `hi·2^f · β·2^(f+e)` stays below 2^52 (truncation headroom).
fn beta_extra_bits(beta: f64, hi: f64, f: u32) -> u32 {
    if beta <= 0.0 || !beta.is_finite() {
        return 0;
    }
    let want = (16.0 - (beta * 2f64.powi(f as i32)).log2()).ceil().max(0.0);
    let room = (52.0 - (hi.max(1.0) * beta).log2() - 2.0 * f as f64)
        .floor()
        .max(0.0);
    want.min(room).min(30.0) as u32
}

/// Extra fractional bits of the scaled reciprocal input `u = z / 2^shift`: `u` is kept as
/// `u·2^4` so that small row sums keep 16× more significant units (products with it are
/// truncated by `f + 4`; their ring magnitude stays below 2^(2f + 4 + log2 α)).
pub const RECIP_EXTRA_BITS: u32 = 4;

/// `t[.., n] += b[n]` for every row.
pub fn add_row_vector(t: &mut RingTensor, b: &RingTensor) -> Result<()> {
    let n = b.numel();
    if t.shape.last() != Some(&n) {
        return Err(shape_err("add_row_vector", &t.shape, &b.shape));
    }
    for (i, v) in t.data.iter_mut().enumerate() {
        *v = v.wrapping_add(b.data[i % n]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Plans: initial guesses and iteration counts from the value ranges.
// ---------------------------------------------------------------------------------------------

/// Which function a [`NewtonPlan`] approximates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NewtonKind {
    Reciprocal,
    InvSqrt,
}

/// Initial guess and iteration count for a reciprocal or inverse square root over a known
/// input range `[lo, hi]` (from the export manifest, widened by a margin).
///
/// **Reciprocal**: the input is first scaled by a public power of two, `u = z / 2^shift` with
/// `2^shift ≥ hi`, so `u ∈ (0, 1]`; the guess is the line `w0 = α − β·u` and Newton–Raphson
/// (Goldschmidt form) squares the relative error `ε = 1 − u·w` at every step.
/// **Inverse square root**: no scaling (`shift = 0`: `v·w²` is tracked as an O(1) quantity);
/// `w0 = α − β·v`; each step maps `ε → ε²(3 + ε)/4` for `ε = 1 − v·w²`.
///
/// [`NewtonPlan::new`] searches `(α, β)` — the line through `(lo, p/g(lo))` and
/// `(hi, q/g(hi))` for a grid of `p, q` — and keeps the one reaching `target` relative error
/// (in exact arithmetic, on 400 log-spaced points of the range) in the fewest steps; `max_err`
/// is its error. CrypTen's reciprocal instead starts from `3·exp(1 − 2x) + 0.003` (an exp of 8
/// squaring rounds) and runs 10 steps (≈ 28 rounds), its guess being only good for inputs in
/// about `[1, 128]`; its inverse square root starts from `2.2·exp(−(x/2 + 0.2)) + 0.2 − x/1024`
/// with 3 steps. The test `reciprocal_plan_beats_crypten_guess` compares both on the same range.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NewtonPlan {
    pub kind: NewtonKind,
    pub lo: f64,
    pub hi: f64,
    pub shift: u32,
    pub alpha: f64,
    pub beta: f64,
    pub iters: u32,
    /// Largest relative error over `[lo, hi]` in exact arithmetic.
    pub max_err: f64,
    /// LayerNorm and 2Quad: the value that is squared (`x − μ`, `s + c`) is scaled by
    /// `2^−input_shift` first, and this plan covers the input range divided by
    /// `4^input_shift` — both ops are invariant to that scale (see [`Ctx::layer_norm`],
    /// [`Ctx::two_quad`]). 0 for a plain reciprocal or inverse square root.
    pub input_shift: u32,
}

impl NewtonPlan {
    /// Largest number of steps considered. A linear guess leaves relative error ≈ 1 − lo/hi at
    /// the low end, which Newton squares away one step per doubling: 2Quad row sums of a fitted
    /// student (`student.init = "fitted"`) span 5·10⁴ and need more than 16 steps.
    pub const MAX_ITERS: u32 = 24;

    /// Relative error after `iters` steps at input `x` (exact arithmetic).
    pub fn rel_err_at(
        kind: NewtonKind,
        alpha: f64,
        beta: f64,
        shift: u32,
        iters: u32,
        x: f64,
    ) -> f64 {
        let s = 2f64.powi(shift as i32);
        match kind {
            NewtonKind::Reciprocal => {
                let u = x / s;
                let mut w = alpha - beta * u;
                for _ in 0..iters {
                    w *= 2.0 - u * w;
                }
                (u * w - 1.0).abs()
            }
            NewtonKind::InvSqrt => {
                let mut w = alpha - beta * x;
                for _ in 0..iters {
                    w *= (3.0 - x * w * w) / 2.0;
                }
                (w * x.sqrt() - 1.0).abs()
            }
        }
    }

    /// Max relative error over `pts` after 0, 1, …, `limit` steps.
    fn errs_by_iter(
        kind: NewtonKind,
        alpha: f64,
        beta: f64,
        shift: u32,
        limit: u32,
        pts: &[f64],
    ) -> Vec<f64> {
        let s = 2f64.powi(shift as i32);
        let mut out = vec![0f64; limit as usize + 1];
        for &x in pts {
            let mut w;
            match kind {
                NewtonKind::Reciprocal => {
                    let u = x / s;
                    w = alpha - beta * u;
                    for (it, o) in out.iter_mut().enumerate() {
                        if it > 0 {
                            w *= 2.0 - u * w;
                        }
                        let e = (u * w - 1.0).abs();
                        *o = if e.is_finite() {
                            o.max(e)
                        } else {
                            f64::INFINITY
                        };
                    }
                }
                NewtonKind::InvSqrt => {
                    w = alpha - beta * x;
                    let r = x.sqrt();
                    for (it, o) in out.iter_mut().enumerate() {
                        if it > 0 {
                            w *= (3.0 - x * w * w) / 2.0;
                        }
                        let e = (w * r - 1.0).abs();
                        *o = if e.is_finite() {
                            o.max(e)
                        } else {
                            f64::INFINITY
                        };
                    }
                }
            }
        }
        out
    }

    /// The plan for inputs in `[lo, hi]` (`0 < lo ≤ hi`) reaching relative error `target` in at
    /// most 16 steps.
    pub fn new(kind: NewtonKind, lo: f64, hi: f64, target: f64) -> Result<Self> {
        Self::search(kind, lo, hi, target, false)
    }

    /// [`Self::new`] for ranges it cannot plan: guesses further below the curve, up to
    /// [`Self::MAX_ITERS`] steps.
    pub fn new_wide(kind: NewtonKind, lo: f64, hi: f64, target: f64) -> Result<Self> {
        Self::search(kind, lo, hi, target, true)
    }

    fn search(kind: NewtonKind, lo: f64, hi: f64, target: f64, wide: bool) -> Result<Self> {
        if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
            return Err(MpcError::Config(format!(
                "{kind:?}: input range [{lo}, {hi}] must be positive and finite"
            )));
        }
        let shift = match kind {
            NewtonKind::Reciprocal => hi.log2().ceil().max(0.0) as u32,
            NewtonKind::InvSqrt => 0,
        };
        let s = 2f64.powi(shift as i32);
        fn ident(x: f64) -> f64 {
            x
        }
        let (g, pmax): (fn(f64) -> f64, f64) = match kind {
            NewtonKind::Reciprocal => (ident, 2.0),
            NewtonKind::InvSqrt => (f64::sqrt, 3f64.sqrt()),
        };
        let (xl, xh) = match kind {
            NewtonKind::Reciprocal => (lo / s, hi / s),
            NewtonKind::InvSqrt => (lo, hi),
        };
        let npts = 400;
        let pts: Vec<f64> = (0..npts)
            .map(|i| lo * (hi / lo).powf(i as f64 / (npts - 1) as f64))
            .collect();
        // p log-spaced (a wide range wants a guess far below the curve at its low end), q linear.
        let (p_floor, p_steps, max_iters) = if wide {
            (1e-8, 128, Self::MAX_ITERS)
        } else {
            (1e-4f64, 64, 16)
        };
        let mut best: Option<(u32, f64, f64, f64)> = None;
        let steps = 48;
        for i in 0..p_steps {
            let p = pmax * 0.98 * p_floor.powf(1.0 - i as f64 / (p_steps - 1) as f64);
            for j in 1..steps {
                let q = pmax * j as f64 / steps as f64;
                let (yl, yh) = (p / g(xl), q / g(xh));
                let beta = if xh > xl { (yl - yh) / (xh - xl) } else { 0.0 };
                let alpha = yl + beta * xl;
                let limit = best.map_or(max_iters, |b| b.0);
                let errs = Self::errs_by_iter(kind, alpha, beta, shift, limit, &pts);
                for (it, &e) in errs.iter().enumerate() {
                    let it = it as u32;
                    if e <= target {
                        let better = match best {
                            None => true,
                            Some((bi, be, _, _)) => it < bi || (it == bi && e < be),
                        };
                        if better {
                            best = Some((it, e, alpha, beta));
                        }
                        break;
                    }
                }
            }
        }
        let (iters, max_err, alpha, beta) = best.ok_or_else(|| {
            MpcError::Config(format!(
                "{kind:?}: no linear initial guess reaches relative error {target:.1e} over \
                 [{lo:.3e}, {hi:.3e}] within {max_iters} steps"
            ))
        })?;
        Ok(Self {
            kind,
            lo,
            hi,
            shift,
            alpha,
            beta,
            iters,
            max_err,
            input_shift: 0,
        })
    }

    /// Communication rounds of the op.
    pub fn rounds(&self) -> u32 {
        match self.kind {
            NewtonKind::Reciprocal => 1 + self.iters,
            NewtonKind::InvSqrt if self.iters == 0 => 0,
            NewtonKind::InvSqrt => 2 * self.iters + 1,
        }
    }
}

/// Chebyshev series of tanh on `[−range, range]`: `coeffs[k]` multiplies `T_k(x / range)`.
///
/// The degree is the smallest (up to 127) whose interpolant at Chebyshev nodes has max error
/// ≤ `target` on 2001 points of the range, in exact arithmetic; fixed point adds a few ulps
/// per level of the recurrence (measured in the tests). Outside the range the series diverges,
/// so the range is the manifest's max |x| times a margin.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ChebPlan {
    pub range: f64,
    pub coeffs: Vec<f64>,
    pub max_err: f64,
}

impl ChebPlan {
    pub fn tanh(range: f64, target: f64) -> Result<Self> {
        if !(range > 0.0 && range.is_finite()) {
            return Err(MpcError::Config(format!(
                "tanh: range {range} must be positive"
            )));
        }
        let f = |t: f64| (range * t).tanh();
        let mut last = None;
        for n in (3..=127).step_by(2) {
            let coeffs = cheb_interp(f, n);
            let err = (0..=2000)
                .map(|i| {
                    let t = -1.0 + 2.0 * i as f64 / 2000.0;
                    (cheb_eval(&coeffs, t) - f(t)).abs()
                })
                .fold(0.0, f64::max);
            last = Some((coeffs, err));
            if err <= target {
                break;
            }
        }
        let (coeffs, max_err) = last.expect("at least one degree tried");
        if max_err > target {
            return Err(MpcError::Config(format!(
                "tanh: no Chebyshev series of degree ≤ 127 reaches {target:.1e} on ±{range:.2}"
            )));
        }
        Ok(Self {
            range,
            coeffs,
            max_err,
        })
    }

    /// Rounds: ⌈log2 degree⌉.
    pub fn rounds(&self) -> u32 {
        let n = self.coeffs.len().saturating_sub(1).max(1);
        (n as f64).log2().ceil() as u32
    }
}

/// Coefficients of the degree-`n` Chebyshev interpolant of `f` on `[−1, 1]`.
pub fn cheb_interp(f: impl Fn(f64) -> f64, n: usize) -> Vec<f64> {
    let m = n + 1;
    let vals: Vec<f64> = (0..m)
        .map(|j| f((std::f64::consts::PI * (j as f64 + 0.5) / m as f64).cos()))
        .collect();
    (0..=n)
        .map(|k| {
            let s: f64 = (0..m)
                .map(|j| {
                    vals[j] * (std::f64::consts::PI * k as f64 * (j as f64 + 0.5) / m as f64).cos()
                })
                .sum();
            s * if k == 0 { 1.0 } else { 2.0 } / m as f64
        })
        .collect()
}

/// `Σ c_k T_k(t)`.
pub fn cheb_eval(c: &[f64], t: f64) -> f64 {
    let (mut t0, mut t1) = (1.0, t);
    let mut s = c[0];
    if c.len() > 1 {
        s += c[1] * t;
    }
    for &ck in &c[2..] {
        let t2 = 2.0 * t * t1 - t0;
        s += ck * t2;
        t0 = t1;
        t1 = t2;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newton_plans_reach_their_target() {
        let r = NewtonPlan::new(NewtonKind::Reciprocal, 10.0, 2000.0, 1e-4).unwrap();
        assert_eq!(r.shift, 11);
        assert!(r.max_err <= 1e-4 && r.iters <= 9, "{r:?}");
        let s = NewtonPlan::new(NewtonKind::InvSqrt, 0.05, 20.0, 1e-4).unwrap();
        assert!(s.max_err <= 1e-4, "{s:?}");
        assert!(NewtonPlan::new(NewtonKind::InvSqrt, 0.0, 1.0, 1e-4).is_err());
    }

    #[test]
    fn wide_reciprocal_ranges_plan() {
        // A fitted student's 2Quad row sums on CoLA dev, scaled and with the range margin.
        assert!(NewtonPlan::new(NewtonKind::Reciprocal, 3.762e-3, 1.736e2, 5e-2).is_err());
        let r = NewtonPlan::new_wide(NewtonKind::Reciprocal, 3.762e-3, 1.736e2, 1e-2).unwrap();
        assert!(
            r.max_err <= 1e-2 && r.iters <= NewtonPlan::MAX_ITERS,
            "{r:?}"
        );
        for x in [3.762e-3, 0.1, 10.0, 1.736e2] {
            let e = NewtonPlan::rel_err_at(
                NewtonKind::Reciprocal,
                r.alpha,
                r.beta,
                r.shift,
                r.iters,
                x,
            );
            assert!(e <= 1e-2, "x = {x}: {e}");
        }
    }

    #[test]
    fn default_ranges_plan() {
        let r = NewtonPlan::new(NewtonKind::Reciprocal, 1.0, 1e4, 1e-3).unwrap();
        let s = NewtonPlan::new(NewtonKind::InvSqrt, 1e-2, 1e2, 1e-3).unwrap();
        assert!(r.iters <= 16 && s.iters <= 16, "{r:?} {s:?}");
    }

    #[test]
    fn cheb_tanh() {
        let p = ChebPlan::tanh(6.0, 1e-4).unwrap();
        assert!(p.max_err <= 1e-4);
        assert!(p.coeffs.len() < 64, "degree {}", p.coeffs.len() - 1);
        for x in [-6.0, -1.0, 0.0, 0.3, 5.9] {
            assert!((cheb_eval(&p.coeffs, x / 6.0) - f64::tanh(x)).abs() < 1e-4);
        }
    }
}

/// One operation's opened values and the dealer's material for it, from which each party
/// computes its share of the result: the last step of every two-party protocol here.
#[derive(Clone, Copy)]
struct Opened<'a> {
    party: Party,
    m: &'a Material,
    /// This party's message, as sent.
    mine: &'a [u64],
    /// The peer's message for this operation.
    theirs: &'a [u64],
}

impl Opened<'_> {
    fn mul(&self, x: &AShare, y: &AShare) -> Result<AShare> {
        let Opened {
            party,
            m,
            mine,
            theirs,
        } = *self;
        let n = x.numel();
        let e = add_vec(&mine[..n], &theirs[..n]);
        let f = add_vec(&mine[n..], &theirs[n..]);
        let data = (0..n)
            .map(|i| {
                e[i].wrapping_mul(y.t.data[i])
                    .wrapping_add(m.a[i].wrapping_mul(f[i]))
                    .wrapping_add(m.c[i])
            })
            .collect();
        Ok(AShare::new(
            party,
            RingTensor::new(x.shape().to_vec(), data)?,
        ))
    }

    fn mul_row(&self, x: &AShare, y: &AShare) -> Result<AShare> {
        let Opened {
            party,
            m,
            mine,
            theirs,
        } = *self;
        let n = x.numel();
        let cols = *x.shape().last().unwrap_or(&1);
        let e = add_vec(&mine[..n], &theirs[..n]);
        let f = add_vec(&mine[n..], &theirs[n..]);
        let data = (0..n)
            .map(|i| {
                let r = i / cols;
                e[i].wrapping_mul(y.t.data[r])
                    .wrapping_add(m.a[i].wrapping_mul(f[r]))
                    .wrapping_add(m.c[i])
            })
            .collect();
        Ok(AShare::new(
            party,
            RingTensor::new(x.shape().to_vec(), data)?,
        ))
    }

    fn square(&self, x: &AShare) -> Result<AShare> {
        let Opened {
            party,
            m,
            mine,
            theirs,
        } = *self;
        let e = add_vec(mine, theirs);
        let data = e
            .iter()
            .enumerate()
            .map(|(i, &ei)| {
                let base = ei.wrapping_mul(2).wrapping_mul(m.a[i]).wrapping_add(m.c[i]);
                match party {
                    Party::P0 => base.wrapping_add(ei.wrapping_mul(ei)),
                    Party::P1 => base,
                }
            })
            .collect();
        Ok(AShare::new(
            party,
            RingTensor::new(x.shape().to_vec(), data)?,
        ))
    }

    fn matmul(&self, x: &AShare, y: &AShare) -> Result<AShare> {
        let Opened {
            party,
            m,
            mine,
            theirs,
        } = *self;
        let n = x.numel();
        let e = RingTensor::new(x.shape().to_vec(), add_vec(&mine[..n], &theirs[..n]))?;
        let f = RingTensor::new(y.shape().to_vec(), add_vec(&mine[n..], &theirs[n..]))?;
        let a = RingTensor::new(x.shape().to_vec(), m.a.clone())?;
        let mut z = e.matmul(&y.t)?;
        z.add_assign(&a.matmul(&f)?)?;
        let c = RingTensor::new(z.shape.clone(), m.c.clone())?;
        z.add_assign(&c)?;
        Ok(AShare::new(party, z))
    }

    fn weight_matmul(&self, x: &AShare, w: &PrivWeight) -> Result<AShare> {
        let Opened {
            party, m, theirs, ..
        } = *self;
        let out_shape = matmul_shape(x.shape(), &w.data.shape)?;
        let mut z = match party {
            Party::P0 => w.matmul_words(&add_vec(&x.t.data, theirs))?,
            Party::P1 => w.matmul_words(&m.a)?,
        };
        for (v, c) in z.iter_mut().zip(&m.c) {
            *v = v.wrapping_add(*c);
        }
        Ok(AShare::new(party, RingTensor::new(out_shape, z)?))
    }

    fn weight_elem(&self, x: &AShare, w: &PrivWeight) -> Result<AShare> {
        let Opened {
            party, m, theirs, ..
        } = *self;
        let cols = w.data.numel();
        let src: Vec<u64> = match party {
            Party::P0 => add_vec(&x.t.data, theirs),
            Party::P1 => m.a.clone(),
        };
        let data = src
            .iter()
            .enumerate()
            .map(|(i, &v)| v.wrapping_mul(w.data.data[i % cols]).wrapping_add(m.c[i]))
            .collect();
        Ok(AShare::new(
            party,
            RingTensor::new(x.shape().to_vec(), data)?,
        ))
    }

    fn and(&self, x: &BShare) -> Result<AShare> {
        let Opened {
            party,
            m,
            mine,
            theirs,
        } = *self;
        let n = x.len();
        let d = xor_vec(&mine[..n], &theirs[..n]);
        let e = xor_vec(&mine[n..], &theirs[n..]);
        let p0 = party == Party::P0;
        let data = (0..n)
            .map(|i| {
                let z = (d[i] & m.b[i]) ^ (e[i] & m.a[i]) ^ m.c[i];
                if p0 { z ^ (d[i] & e[i]) } else { z }
            })
            .collect();
        Ok(AShare::new(party, RingTensor::new(vec![n], data)?))
    }

    fn and_owned(&self, x: &BShare) -> Result<AShare> {
        let Opened {
            party,
            m,
            mine,
            theirs,
        } = *self;
        // d = x0 ⊕ a (P0's message), e = x1 ⊕ b (P1's); x0 & x1 = d&e ⊕ a&e ⊕ d&b ⊕ c.
        let n = x.len();
        let data = match party {
            Party::P0 => (0..n)
                .map(|i| (mine[i] & theirs[i]) ^ (m.a[i] & theirs[i]) ^ m.c[i])
                .collect(),
            Party::P1 => (0..n).map(|i| (theirs[i] & m.b[i]) ^ m.c[i]).collect(),
        };
        Ok(AShare::new(party, RingTensor::new(vec![n], data)?))
    }

    fn b2a(&self, n: &usize) -> Result<AShare> {
        let Opened {
            party,
            m,
            mine,
            theirs,
        } = *self;
        let c = xor_vec(mine, theirs);
        let p0 = party == Party::P0;
        let data = (0..*n)
            .map(|j| {
                let r = m.c[j];
                if (c[j / 64] >> (j % 64)) & 1 == 1 {
                    // b = 1 − r
                    if p0 {
                        1u64.wrapping_sub(r)
                    } else {
                        r.wrapping_neg()
                    }
                } else {
                    r
                }
            })
            .collect();
        Ok(AShare::new(party, RingTensor::new(vec![*n], data)?))
    }

    fn owned_bit_and(&self, x: &BShare, n: &usize) -> Result<AShare> {
        let Opened {
            party,
            m,
            mine,
            theirs,
        } = *self;
        let (u, v) = match party {
            Party::P0 => (mine, theirs),
            Party::P1 => (theirs, mine),
        };
        let data = (0..*n)
            .map(|j| {
                let bit = |w: &[u64]| (w[j / 64] >> (j % 64)) & 1;
                owned_bit_and_share(party, bit(&x.words), bit(u), bit(v), bit(&m.a), m.c[j])
            })
            .collect();
        Ok(AShare::new(party, RingTensor::new(vec![*n], data)?))
    }
}
