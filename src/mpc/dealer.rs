//! The dealer (trusted third party): correlated randomness from PRG seeds.
//!
//! The dealer draws two seeds from the OS and gives seed `s_i` to party `i` (32 bytes each). A
//! party expands its seed with ChaCha20 ([`ChaCha20Rng`], stream 0) and draws its share of every
//! mask from it, in program order: P0 draws `a0, b0, c0`, P1 draws `a1, b1`. The dealer holds
//! both seeds, draws the same values, and sends P1 the only thing neither seed gives:
//! `c1 = (a0 + a1)(b0 + b1) − c0`. **What crosses, per item** (counted as `dealer_bytes`,
//! apart from the parties' traffic):
//!
//! | item ([`Req`]) | P1 → dealer | dealer → P1 |
//! |---|---|---|
//! | elementwise triple, `n` elements | request words | `n` words |
//! | row-broadcast triple `a[r, c]`, `b[r]` | request | `r·c` words |
//! | square pair `(a, a²)` | request | `n` words |
//! | matrix triple `[m, k]·[k, n]` (batched) | request | `m·n` words (per batch) |
//! | weight product `a·B0(id)`, `a[m, k]` | request | `m·n` words |
//! | weight elementwise `a ∘ B0(id)` | request | `r·c` words |
//! | AND triple over `n` words (XOR shares, `c = a & b`) | request | `n` words |
//! | owned AND triple (`a` P0's alone, `b` P1's alone) | request | `n` words |
//! | shared random bits, `n` of them, binary and arithmetic | request | `n` words |
//!
//! Binary material (issue 9) is XOR-shared: `a = a0 ⊕ a1`. An **AND triple** gives
//! `c1 = ((a0 ⊕ a1) & (b0 ⊕ b1)) ⊕ c0`. An **owned AND triple** serves the first AND of a
//! comparison, whose operands are each known to one party (`x0 & x1` for an arithmetic sharing
//! `x = x0 + x1`): P0 draws `a` and `c0`, P1 draws `b`, `c1 = (a & b) ⊕ c0`, and each party opens
//! only its own operand. **Shared random bits** (CrypTen's B2A of a single bit) are `n` bits
//! `r = r0 ⊕ r1`, packed 64 to a word, together with an additive sharing of the same bits as ring
//! integers: P0 draws `r0` and `rA0`, P1 draws `r1`, the dealer sends `rA1 = r − rA0`.
//!
//! Requests of one round travel in one frame (a few words per item) and their answers in one
//! frame back, while the parties exchange their own round.
//!
//! **Seeds and sessions.** A party's hello names the session ([`super::session::SessionId`]);
//! the dealer ([`Dealer::greet`]) binds itself to the first session it hears of, takes the
//! party's role from its authenticated certificate when there is one (a hello claiming another
//! role is refused), and hands each role's seed at most once. **Bounds.** A request frame is
//! capped ([`MAX_REQUEST_WORDS`]), every item's size is computed with checked arithmetic and a
//! round's material is capped ([`DEFAULT_MAX_ROUND_WORDS`]); the cache of weight masks is bounded
//! ([`MAX_CACHED_MASK_WORDS`]).
//!
//! **Weights** are P0's and fixed across inferences. Each private weight `W` (id `j`) gets a
//! per-model mask `B0 = PRG(w, stream 1 + j)` from P0's **weight seed** `w`, which P0 names in
//! its hello to the dealer (a fresh one per session by default; `mpc serve` keeps one per loaded
//! model, so it masks once and sends every client the same `F`). P0 sends `F = W − B0` to P1 at
//! the start of each session (setup). A product `x·W` then needs, per inference, only P1's `e = x1 − a` (P1 → P0) for a
//! fresh `a` from P1's seed, and the dealer's share of `a·B0`:
//! `z0 = (x0 + e)·W + c0`, `z1 = a·F + c1` (with `c1 = a·B0 − c0`), so `z0 + z1 = x·W`.

use std::collections::HashMap;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use super::net::{Channel, FRAME_HEADER_BYTES};
use super::ring::{PackedRhs, matmul_u64, matmul_u64_packed};
use super::session::{PROTOCOL_VERSION, SessionId};
use super::share::os_seed;
use super::{MpcError, Party, Result};

/// Largest request frame the dealer reads (a few words per item; a round has at most thousands
/// of items).
pub const MAX_REQUEST_WORDS: u64 = 1 << 20;
/// Default cap on the words of material (both parties' `a`, `b`, `c`) of one round: 2^28 words
/// (2 GiB), well above the largest round of BERT-base at sequence length 512.
pub const DEFAULT_MAX_ROUND_WORDS: usize = 1 << 28;
/// Cap on the dealer's cache of weight masks (2^29 words, 4 GiB: BERT-large's weights fit); past
/// it the cache is emptied and masks are drawn again.
pub const MAX_CACHED_MASK_WORDS: usize = 1 << 29;

const DEALER_HELLO: u64 = u64::from_le_bytes(*b"mpcf-dlr");
const HELLO_WORDS: usize = 7;
/// P0's hello also carries its weight seed (see [`DealerClient::connect`]).
const P0_HELLO_WORDS: usize = HELLO_WORDS + 4;
const REPLY_WORDS: usize = 5;
const REPLY_SEED: u64 = 1;
const REPLY_REFUSED: u64 = 2;

/// Why the dealer refused a hello (sent back, so the party's error says it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Malformed = 1,
    NotYourRole = 2,
    AlreadyServed = 3,
    OtherSession = 4,
    Busy = 5,
}

impl Refusal {
    fn from_code(c: u64) -> Option<Self> {
        [
            Refusal::Malformed,
            Refusal::NotYourRole,
            Refusal::AlreadyServed,
            Refusal::OtherSession,
            Refusal::Busy,
        ]
        .into_iter()
        .find(|r| *r as u64 == c)
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed hello or another protocol version",
            Refusal::NotYourRole => "the hello claims a role other than the certificate's",
            Refusal::AlreadyServed => "this role's seed was already handed out in this session",
            Refusal::OtherSession => "the hello names another session",
            Refusal::Busy => "the dealer serves its maximum number of sessions; try again later",
        }
    }
}

/// How the dealer hands out a seed: `claim(role, session, P0's weight seed)` gives the role's
/// seed for the session or a refusal (one [`Dealer`]'s, or a dealer service's book of sessions).
pub type Claim<'a> =
    dyn FnMut(Party, SessionId, Option<[u8; 32]>) -> std::result::Result<[u8; 32], Refusal> + 'a;

/// Reads a party's hello ([`DealerClient::connect`]) and sends the seed that `claim` gives for
/// its role and session, or a refusal. The role is `authenticated` (from the connection's
/// certificate) when given, and a hello claiming another is refused; otherwise (plaintext) the
/// claimed one. Returns the role, the session and the bytes moved.
pub fn greet(
    chan: &mut dyn Channel,
    authenticated: Option<Party>,
    claim: &mut Claim<'_>,
) -> Result<(Party, SessionId, u64)> {
    let hello = chan.recv_max("dealer hello", P0_HELLO_WORDS as u64)?;
    let claimed = hello.get(2).and_then(|&p| Party::from_index(p as usize));
    let want = match claimed {
        Some(Party::P0) => P0_HELLO_WORDS,
        _ => HELLO_WORDS,
    };
    let (session, weight_seed) = if hello.len() == want {
        let ws = (want == P0_HELLO_WORDS).then(|| words_to_seed(&hello[HELLO_WORDS..]));
        (SessionId::from_words(&hello[3..HELLO_WORDS]), ws)
    } else {
        (None, None)
    };
    let verdict = match (claimed, session) {
        _ if hello[0] != DEALER_HELLO || hello[1] != PROTOCOL_VERSION => Err(Refusal::Malformed),
        (None, _) | (_, None) => Err(Refusal::Malformed),
        (Some(c), _) if authenticated.is_some_and(|a| a != c) => Err(Refusal::NotYourRole),
        (Some(c), Some(s)) => match weight_seed.transpose() {
            Ok(ws) => claim(c, s, ws).map(|seed| (c, s, seed)),
            Err(_) => Err(Refusal::Malformed),
        },
    };
    let mut reply = [0u64; REPLY_WORDS];
    match &verdict {
        Ok((_, _, seed)) => {
            reply[0] = REPLY_SEED;
            reply[1..].copy_from_slice(&seed_to_words(seed));
        }
        Err(r) => {
            reply[0] = REPLY_REFUSED;
            reply[1] = *r as u64;
        }
    }
    chan.send("dealer hello", &reply)?;
    let bytes = 2 * FRAME_HEADER_BYTES + 8 * (hello.len() + REPLY_WORDS) as u64;
    let (party, session, _) = verdict.map_err(|r| {
        let claim = claimed.map_or("no valid role".to_string(), |c| format!("{c:?}"));
        MpcError::Dealer(format!("refused a hello claiming {claim}: {}", r.reason()))
    })?;
    Ok((party, session, bytes))
}

/// One item of correlated randomness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Req {
    /// Elementwise triple over `n` elements.
    Mul { n: usize },
    /// `a[rows, cols]`, `b[rows]`, `c = a ∘ b` with `b` broadcast along each row.
    MulRow { rows: usize, cols: usize },
    /// `(a, a²)` over `n` elements.
    Square { n: usize },
    /// Matrix triple: `a[m, k]`, `b[k, n]`, `c = a·b`, `batch` times (`batch = 0`: one, 2-D).
    MatMul {
        batch: usize,
        m: usize,
        k: usize,
        n: usize,
    },
    /// P1's `a[m, k]` times P0's weight mask `B0(id)[k, n]`.
    WeightMatMul {
        id: u64,
        m: usize,
        k: usize,
        n: usize,
    },
    /// P1's `a[rows, cols]` times P0's weight mask `B0(id)[cols]` broadcast over rows.
    WeightElem { id: u64, rows: usize, cols: usize },
    /// Binary AND triple over `n` words: `c = a & b`, all XOR-shared.
    And { n: usize },
    /// Owned AND triple over `n` words: `a` drawn by P0 alone, `b` by P1 alone, `c = a & b`
    /// XOR-shared.
    AndOwned { n: usize },
    /// `n` shared random bits: binary (`ceil(n/64)` words, XOR-shared) and arithmetic (`n`
    /// ring integers 0/1, additively shared).
    Bits { n: usize },
}

const K_MUL: u64 = 1;
const K_MULROW: u64 = 2;
const K_SQUARE: u64 = 3;
const K_MATMUL: u64 = 4;
const K_WMATMUL: u64 = 5;
const K_WELEM: u64 = 6;
const K_AND: u64 = 7;
const K_ANDOWN: u64 = 8;
const K_BITS: u64 = 9;

/// Words holding `n` packed bits.
pub fn bit_words(n: usize) -> usize {
    n.div_ceil(64)
}

impl Req {
    fn encode(&self, out: &mut Vec<u64>) {
        let u = |x: usize| x as u64;
        match *self {
            Req::Mul { n } => out.extend([K_MUL, u(n)]),
            Req::MulRow { rows, cols } => out.extend([K_MULROW, u(rows), u(cols)]),
            Req::Square { n } => out.extend([K_SQUARE, u(n)]),
            Req::MatMul { batch, m, k, n } => out.extend([K_MATMUL, u(batch), u(m), u(k), u(n)]),
            Req::WeightMatMul { id, m, k, n } => out.extend([K_WMATMUL, id, u(m), u(k), u(n)]),
            Req::WeightElem { id, rows, cols } => out.extend([K_WELEM, id, u(rows), u(cols)]),
            Req::And { n } => out.extend([K_AND, u(n)]),
            Req::AndOwned { n } => out.extend([K_ANDOWN, u(n)]),
            Req::Bits { n } => out.extend([K_BITS, u(n)]),
        }
    }

    fn decode(words: &[u64], pos: &mut usize) -> Result<Req> {
        let bad = || MpcError::Dealer("malformed request".into());
        let mut take = |n: usize| -> Result<Vec<u64>> {
            let s = words.get(*pos..*pos + n).ok_or_else(bad)?.to_vec();
            *pos += n;
            Ok(s)
        };
        let kind = take(1)?[0];
        let z = |x: u64| x as usize;
        Ok(match kind {
            K_MUL => Req::Mul { n: z(take(1)?[0]) },
            K_MULROW => {
                let v = take(2)?;
                Req::MulRow {
                    rows: z(v[0]),
                    cols: z(v[1]),
                }
            }
            K_SQUARE => Req::Square { n: z(take(1)?[0]) },
            K_MATMUL => {
                let v = take(4)?;
                Req::MatMul {
                    batch: z(v[0]),
                    m: z(v[1]),
                    k: z(v[2]),
                    n: z(v[3]),
                }
            }
            K_WMATMUL => {
                let v = take(4)?;
                Req::WeightMatMul {
                    id: v[0],
                    m: z(v[1]),
                    k: z(v[2]),
                    n: z(v[3]),
                }
            }
            K_WELEM => {
                let v = take(3)?;
                Req::WeightElem {
                    id: v[0],
                    rows: z(v[1]),
                    cols: z(v[2]),
                }
            }
            K_AND => Req::And { n: z(take(1)?[0]) },
            K_ANDOWN => Req::AndOwned { n: z(take(1)?[0]) },
            K_BITS => Req::Bits { n: z(take(1)?[0]) },
            _ => return Err(bad()),
        })
    }

    /// (len a, len b, len c) of the material.
    fn lens(&self) -> (usize, usize, usize) {
        self.checked_lens().expect("request sizes fit in memory")
    }

    /// [`Req::lens`], `None` when a size overflows (a request from the wire).
    fn checked_lens(&self) -> Option<(usize, usize, usize)> {
        let mul = |a: usize, b: usize| a.checked_mul(b);
        Some(match *self {
            Req::Mul { n } => (n, n, n),
            Req::MulRow { rows, cols } => (mul(rows, cols)?, rows, mul(rows, cols)?),
            Req::Square { n } => (n, 0, n),
            Req::MatMul { batch, m, k, n } => {
                let b = batch.max(1);
                (
                    mul(b, mul(m, k)?)?,
                    mul(b, mul(k, n)?)?,
                    mul(b, mul(m, n)?)?,
                )
            }
            Req::WeightMatMul { m, k, n, .. } => {
                mul(k, n)?; // the mask the dealer draws
                (mul(m, k)?, 0, mul(m, n)?)
            }
            Req::WeightElem { rows, cols, .. } => (mul(rows, cols)?, 0, mul(rows, cols)?),
            Req::And { n } | Req::AndOwned { n } => (n, n, n),
            Req::Bits { n } => (bit_words(n), 0, n),
        })
    }

    /// Words the dealer holds for this item (both parties' material, the mask of a weight
    /// item), `None` on overflow.
    fn dealer_words(&self) -> Option<usize> {
        let (a, b, c) = self.checked_lens()?;
        let mask = match *self {
            Req::WeightMatMul { k, n, .. } => k.checked_mul(n)?,
            Req::WeightElem { cols, .. } => cols,
            _ => 0,
        };
        a.checked_add(b)?
            .checked_mul(2)?
            .checked_add(c.checked_mul(3)?)?
            .checked_add(mask)
    }

    /// Words of `c1` the dealer sends for this item.
    pub fn answer_len(&self) -> usize {
        self.lens().2
    }
}

/// One party's share of one item. For weight items P0 holds only `c` and P1 only `a` (and `c`
/// once received).
#[derive(Clone, Default)]
pub struct Material {
    pub a: Vec<u64>,
    pub b: Vec<u64>,
    pub c: Vec<u64>,
}

fn random_vec(rng: &mut ChaCha20Rng, n: usize) -> Vec<u64> {
    (0..n).map(|_| rng.next_u64()).collect()
}

/// The values `party` draws from its PRG for `req` — the same function for the party and for
/// the dealer, which keeps them in step.
fn draw(rng: &mut ChaCha20Rng, party: Party, req: &Req) -> Material {
    let (la, lb, lc) = req.lens();
    if let Req::AndOwned { n } = *req {
        // P0 owns `a` (and draws `c0`), P1 owns `b`.
        return match party {
            Party::P0 => {
                let a = random_vec(rng, n);
                let c = random_vec(rng, n);
                Material {
                    a,
                    b: Vec::new(),
                    c,
                }
            }
            Party::P1 => Material {
                b: random_vec(rng, n),
                ..Material::default()
            },
        };
    }
    let weight = matches!(req, Req::WeightMatMul { .. } | Req::WeightElem { .. });
    match (party, weight) {
        (Party::P0, false) => {
            let a = random_vec(rng, la);
            let b = random_vec(rng, lb);
            let c = random_vec(rng, lc);
            Material { a, b, c }
        }
        (Party::P1, false) => {
            let a = random_vec(rng, la);
            let b = random_vec(rng, lb);
            Material {
                a,
                b,
                c: Vec::new(),
            }
        }
        (Party::P0, true) => Material {
            c: random_vec(rng, lc),
            ..Material::default()
        },
        (Party::P1, true) => Material {
            a: random_vec(rng, la),
            ..Material::default()
        },
    }
}

/// P0's per-model mask of weight `id`: `len` words of ChaCha20 stream `1 + id` of seed `s0`.
pub fn weight_mask(seed0: &[u8; 32], id: u64, len: usize) -> Vec<u64> {
    let mut rng = ChaCha20Rng::from_seed(*seed0);
    rng.set_stream(1 + id);
    random_vec(&mut rng, len)
}

fn seed_to_words(seed: &[u8; 32]) -> Vec<u64> {
    seed.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn words_to_seed(w: &[u64]) -> Result<[u8; 32]> {
    if w.len() != 4 {
        return Err(MpcError::Dealer("malformed seed".into()));
    }
    let mut s = [0u8; 32];
    for (i, x) in w.iter().enumerate() {
        s[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes());
    }
    Ok(s)
}

/// P1's link to the dealer failed mid-session (a restarted or unreachable dealer): say so, since
/// the bare channel error names only the op.
fn dealer_link(e: MpcError) -> MpcError {
    MpcError::Dealer(format!("the link to the dealer failed: {e}"))
}

/// A party's side of the dealer: its PRG, and for P1 the channel to the dealer.
pub struct DealerClient {
    party: Party,
    /// P0's per-model weight masks come from this seed (by default the session seed; `mpc
    /// serve` keeps one per loaded model, so it masks its weights once).
    weight_seed: [u8; 32],
    rng: ChaCha20Rng,
    chan: Option<Box<dyn Channel>>,
}

impl DealerClient {
    /// `chan` is required for P1 (the dealer's answers come over it) and unused by P0.
    pub fn new(party: Party, seed: [u8; 32], chan: Option<Box<dyn Channel>>) -> Result<Self> {
        if party == Party::P1 && chan.is_none() {
            return Err(MpcError::Dealer("P1 needs a channel to the dealer".into()));
        }
        Ok(Self {
            party,
            weight_seed: seed,
            rng: ChaCha20Rng::from_seed(seed),
            chan,
        })
    }

    /// Masks weights with `weight_seed` instead of the session seed (the dealer must be told:
    /// [`DealerClient::connect`] does).
    pub fn with_weight_seed(mut self, weight_seed: [u8; 32]) -> Self {
        self.weight_seed = weight_seed;
        self
    }

    /// Connects to a dealer over `chan`: announces the party and the session, receives its
    /// seed (or the dealer's refusal). P0 also tells the dealer the seed of its weight masks:
    /// `weight_seed`, or a fresh one.
    pub fn connect(
        party: Party,
        mut chan: Box<dyn Channel>,
        session: SessionId,
        weight_seed: Option<[u8; 32]>,
    ) -> Result<Self> {
        let mut hello = vec![DEALER_HELLO, PROTOCOL_VERSION, party.index() as u64];
        hello.extend(session.to_words());
        let weight_seed = (party == Party::P0).then(|| weight_seed.unwrap_or_else(os_seed));
        if let Some(ws) = &weight_seed {
            hello.extend(seed_to_words(ws));
        }
        chan.send("dealer hello", &hello)?;
        let reply = chan.recv_exact("dealer hello", REPLY_WORDS)?;
        let seed = match reply[0] {
            REPLY_SEED => words_to_seed(&reply[1..])?,
            REPLY_REFUSED => {
                let why = Refusal::from_code(reply[1]).map_or("no reason given", Refusal::reason);
                return Err(MpcError::Dealer(format!(
                    "the dealer refused {party:?}: {why}"
                )));
            }
            _ => return Err(MpcError::Dealer("malformed reply to the hello".into())),
        };
        let chan = match party {
            Party::P0 => None,
            Party::P1 => Some(chan),
        };
        let c = Self::new(party, seed, chan)?;
        Ok(match weight_seed {
            Some(ws) => c.with_weight_seed(ws),
            None => c,
        })
    }

    pub fn party(&self) -> Party {
        self.party
    }

    /// This party's material for `reqs`, in order (P1's `c` still empty).
    pub fn draw(&mut self, reqs: &[Req]) -> Vec<Material> {
        reqs.iter()
            .map(|r| draw(&mut self.rng, self.party, r))
            .collect()
    }

    /// P1: sends the requests of one round to the dealer. Returns the bytes sent (0 for P0).
    pub fn request(&mut self, op: &str, reqs: &[Req]) -> Result<u64> {
        let Some(chan) = self.chan.as_mut() else {
            return Ok(0);
        };
        let mut words = vec![reqs.len() as u64];
        for r in reqs {
            r.encode(&mut words);
        }
        chan.send(op, &words).map_err(dealer_link)?;
        Ok(FRAME_HEADER_BYTES + 8 * words.len() as u64)
    }

    /// P1: receives the dealer's `c1` for the requests of one round into `mats`. Returns the
    /// bytes received (0 for P0).
    pub fn receive(&mut self, op: &str, reqs: &[Req], mats: &mut [Material]) -> Result<u64> {
        let Some(chan) = self.chan.as_mut() else {
            return Ok(0);
        };
        let want: usize = reqs.iter().map(Req::answer_len).sum();
        let words = chan.recv_exact(op, want).map_err(dealer_link)?;
        let mut pos = 0;
        for (r, m) in reqs.iter().zip(mats.iter_mut()) {
            let n = r.answer_len();
            m.c = words[pos..pos + n].to_vec();
            pos += n;
        }
        Ok(FRAME_HEADER_BYTES + 8 * words.len() as u64)
    }

    /// P0's per-model mask of weight `id` (`None` for P1, which must not know it).
    pub fn weight_mask(&self, id: u64, len: usize) -> Option<Vec<u64>> {
        (self.party == Party::P0).then(|| weight_mask(&self.weight_seed, id, len))
    }

    /// P1: tells the dealer the session is over.
    pub fn finish(&mut self) -> Result<()> {
        if let Some(chan) = self.chan.as_mut() {
            chan.send("dealer", &[0])?;
        }
        Ok(())
    }
}

/// What the dealer sent and received.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DealerStats {
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub rounds: u64,
    pub items: u64,
}

/// The trusted dealer. Holds both seeds: no `Debug`.
pub struct Dealer {
    seeds: [[u8; 32]; 2],
    rng: [ChaCha20Rng; 2],
    masks: HashMap<u64, Vec<u64>>,
    /// Matrix masks packed for the ring matmul, keyed by `(id, k, n)`.
    packed: HashMap<(u64, usize, usize), PackedRhs>,
    /// Words in `masks` and `packed`.
    cached_words: usize,
    max_round_words: usize,
    /// The session this dealer serves, fixed by the first accepted hello.
    session: Option<SessionId>,
    /// Whether each party's seed has been handed out.
    given: [bool; 2],
    /// P0's weight seed, from its hello (in process: `seeds[0]`).
    weight_seed: Option<[u8; 32]>,
    pub stats: DealerStats,
}

impl Dealer {
    /// `party`'s seed, once, for the session of the first accepted hello only.
    fn claim(
        &mut self,
        party: Party,
        session: SessionId,
        weight_seed: Option<[u8; 32]>,
    ) -> std::result::Result<[u8; 32], Refusal> {
        if self.given[party.index()] {
            return Err(Refusal::AlreadyServed);
        }
        if self.session.is_some_and(|b| b != session) {
            return Err(Refusal::OtherSession);
        }
        // Marked before the reply goes out: a send that fails may still have delivered it.
        self.session = Some(session);
        self.given[party.index()] = true;
        if party == Party::P0 {
            self.weight_seed = weight_seed;
        }
        Ok(self.seeds[party.index()])
    }
}

impl Default for Dealer {
    fn default() -> Self {
        Self::new()
    }
}

impl Dealer {
    /// Seeds from the OS.
    pub fn new() -> Self {
        Self::from_seeds([os_seed(), os_seed()])
    }

    pub fn from_seeds(seeds: [[u8; 32]; 2]) -> Self {
        Self {
            seeds,
            rng: [
                ChaCha20Rng::from_seed(seeds[0]),
                ChaCha20Rng::from_seed(seeds[1]),
            ],
            masks: HashMap::new(),
            packed: HashMap::new(),
            cached_words: 0,
            max_round_words: DEFAULT_MAX_ROUND_WORDS,
            session: None,
            given: [false; 2],
            weight_seed: None,
            stats: DealerStats::default(),
        }
    }

    /// Masks P0's weights from `weight_seed` (a dealer service, for the session of a P0 that
    /// said so in its hello).
    pub fn with_weight_seed(mut self, weight_seed: [u8; 32]) -> Self {
        self.weight_seed = Some(weight_seed);
        self
    }

    /// The seed of P0's weight masks.
    fn weight_seed(&self) -> [u8; 32] {
        self.weight_seed.unwrap_or(self.seeds[0])
    }

    /// Caps the material of one round (words of both parties' `a`, `b`, `c`).
    pub fn with_max_round_words(mut self, words: usize) -> Self {
        self.max_round_words = words;
        self
    }

    /// The seed of `party` (hand it over privately).
    pub fn seed(&self, party: Party) -> [u8; 32] {
        self.seeds[party.index()]
    }

    /// Whether both parties have their seeds.
    pub fn all_seeds_given(&self) -> bool {
        self.given == [true; 2]
    }

    /// Reads a party's hello and sends its seed, or a refusal ([`greet`]). Each role's seed goes
    /// out once, and only to hellos naming the session of the first accepted one.
    pub fn greet(&mut self, chan: &mut dyn Channel, authenticated: Option<Party>) -> Result<Party> {
        let (party, _, bytes) = greet(chan, authenticated, &mut |p, s, w| self.claim(p, s, w))?;
        let reply = FRAME_HEADER_BYTES + 8 * REPLY_WORDS as u64;
        self.stats.bytes_recv += bytes - reply;
        self.stats.bytes_sent += reply;
        Ok(party)
    }

    /// Answers P1's requests until an empty request list or the channel closes.
    pub fn serve(&mut self, chan: &mut dyn Channel) -> Result<()> {
        loop {
            let words = match chan.recv_max("dealer", MAX_REQUEST_WORDS) {
                Ok(w) => w,
                Err(MpcError::PeerClosed { .. }) => return Ok(()),
                Err(e) => return Err(e),
            };
            self.stats.bytes_recv += FRAME_HEADER_BYTES + 8 * words.len() as u64;
            let n = *words
                .first()
                .ok_or_else(|| MpcError::Dealer("empty request".into()))?
                as usize;
            if n == 0 {
                return Ok(());
            }
            let reqs = self.decode_round(&words, n)?;
            let out = self.answer(&reqs);
            chan.send("dealer", &out)?;
            self.stats.bytes_sent += FRAME_HEADER_BYTES + 8 * out.len() as u64;
            self.stats.rounds += 1;
            self.stats.items += n as u64;
        }
    }

    /// The `n` requests of one round's frame, each within bounds, all of them together within
    /// the round cap.
    fn decode_round(&self, words: &[u64], n: usize) -> Result<Vec<Req>> {
        // Every item takes at least two words: a count above that is malformed.
        if n > words.len() / 2 {
            return Err(MpcError::Dealer("malformed request".into()));
        }
        let mut pos = 1;
        let mut reqs = Vec::with_capacity(n);
        let mut total = 0usize;
        for _ in 0..n {
            let r = Req::decode(words, &mut pos)?;
            total = r
                .dealer_words()
                .and_then(|w| total.checked_add(w))
                .filter(|&t| t <= self.max_round_words)
                .ok_or_else(|| {
                    MpcError::Dealer(format!(
                        "a round's requests exceed the cap of {} words",
                        self.max_round_words
                    ))
                })?;
            reqs.push(r);
        }
        if pos != words.len() {
            return Err(MpcError::Dealer("malformed request".into()));
        }
        Ok(reqs)
    }

    /// Makes room for `len` more cached words: past the cap the cache starts over.
    fn reserve_cache(&mut self, len: usize) {
        if self.cached_words.saturating_add(len) > MAX_CACHED_MASK_WORDS {
            self.masks.clear();
            self.packed.clear();
            self.cached_words = 0;
        }
        self.cached_words += len;
    }

    fn mask(&mut self, id: u64, len: usize) -> &[u64] {
        let seed = self.weight_seed();
        if self.masks.get(&id).is_none_or(|m| m.len() != len) {
            self.reserve_cache(len);
            self.masks.insert(id, weight_mask(&seed, id, len));
        }
        &self.masks[&id]
    }

    /// `c1` for each request, concatenated.
    pub fn answer(&mut self, reqs: &[Req]) -> Vec<u64> {
        let mut out = Vec::with_capacity(reqs.iter().map(Req::answer_len).sum());
        for r in reqs {
            let m0 = draw(&mut self.rng[0], Party::P0, r);
            let m1 = draw(&mut self.rng[1], Party::P1, r);
            let sum = |x: &[u64], y: &[u64]| -> Vec<u64> {
                x.iter().zip(y).map(|(p, q)| p.wrapping_add(*q)).collect()
            };
            let c: Vec<u64> = match *r {
                Req::Mul { .. } => {
                    let (a, b) = (sum(&m0.a, &m1.a), sum(&m0.b, &m1.b));
                    a.iter().zip(&b).map(|(p, q)| p.wrapping_mul(*q)).collect()
                }
                Req::MulRow { cols, .. } => {
                    let (a, b) = (sum(&m0.a, &m1.a), sum(&m0.b, &m1.b));
                    a.iter()
                        .enumerate()
                        .map(|(i, p)| p.wrapping_mul(b[i / cols]))
                        .collect()
                }
                Req::Square { .. } => {
                    let a = sum(&m0.a, &m1.a);
                    a.iter().map(|p| p.wrapping_mul(*p)).collect()
                }
                Req::MatMul { batch, m, k, n } => {
                    let (a, b) = (sum(&m0.a, &m1.a), sum(&m0.b, &m1.b));
                    let mut c = Vec::with_capacity(batch.max(1) * m * n);
                    for i in 0..batch.max(1) {
                        c.extend(matmul_u64(
                            &a[i * m * k..(i + 1) * m * k],
                            &b[i * k * n..(i + 1) * k * n],
                            m,
                            k,
                            n,
                        ));
                    }
                    c
                }
                Req::WeightMatMul { id, m, k, n } => {
                    let a = m1.a;
                    if !self.packed.contains_key(&(id, k, n)) {
                        let p = PackedRhs::new(&weight_mask(&self.weight_seed(), id, k * n), k, n);
                        self.reserve_cache(k * n);
                        self.packed.insert((id, k, n), p);
                    }
                    matmul_u64_packed(&a, &self.packed[&(id, k, n)], m)
                }
                Req::WeightElem { id, cols, .. } => {
                    let a = m1.a;
                    let b0 = self.mask(id, cols);
                    a.iter()
                        .enumerate()
                        .map(|(i, p)| p.wrapping_mul(b0[i % cols]))
                        .collect()
                }
                Req::And { .. } => {
                    // XOR-shared: c1 = (a & b) ⊕ c0.
                    out.extend(
                        m0.a.iter()
                            .zip(&m1.a)
                            .zip(m0.b.iter().zip(&m1.b))
                            .zip(&m0.c)
                            .map(|(((a0, a1), (b0, b1)), c0)| ((a0 ^ a1) & (b0 ^ b1)) ^ c0),
                    );
                    continue;
                }
                Req::AndOwned { .. } => {
                    out.extend(
                        m0.a.iter()
                            .zip(&m1.b)
                            .zip(&m0.c)
                            .map(|((a, b), c0)| (a & b) ^ c0),
                    );
                    continue;
                }
                Req::Bits { n } => (0..n)
                    .map(|j| ((m0.a[j / 64] ^ m1.a[j / 64]) >> (j % 64)) & 1)
                    .collect(),
            };
            out.extend(c.iter().zip(&m0.c).map(|(x, y)| x.wrapping_sub(*y)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mpc::net::mem_pair;
    use std::time::Duration;

    #[test]
    fn triples_open_to_products() {
        let mut dealer = Dealer::new();
        let (a, mut b) = mem_pair(Duration::from_secs(5));
        let seeds = [dealer.seed(Party::P0), dealer.seed(Party::P1)];
        let h = std::thread::spawn(move || {
            dealer.serve(&mut b).unwrap();
            dealer
        });
        let mut p0 = DealerClient::new(Party::P0, seeds[0], None).unwrap();
        let mut p1 = DealerClient::new(Party::P1, seeds[1], Some(Box::new(a))).unwrap();
        let reqs = vec![
            Req::Mul { n: 5 },
            Req::MulRow { rows: 2, cols: 3 },
            Req::Square { n: 4 },
            Req::MatMul {
                batch: 2,
                m: 3,
                k: 4,
                n: 2,
            },
            Req::MatMul {
                batch: 0,
                m: 2,
                k: 3,
                n: 2,
            },
            Req::WeightMatMul {
                id: 7,
                m: 2,
                k: 3,
                n: 4,
            },
            Req::WeightElem {
                id: 8,
                rows: 2,
                cols: 3,
            },
            Req::And { n: 3 },
            Req::AndOwned { n: 2 },
            Req::Bits { n: 70 },
        ];
        let m0 = p0.draw(&reqs);
        let mut m1 = p1.draw(&reqs);
        assert!(p1.request("t", &reqs).unwrap() > 0);
        assert!(p1.receive("t", &reqs, &mut m1).unwrap() > 0);
        p1.finish().unwrap();
        let dealer = h.join().unwrap();
        assert_eq!(dealer.stats.items, reqs.len() as u64);
        let add = |x: &[u64], y: &[u64]| -> Vec<u64> {
            x.iter().zip(y).map(|(p, q)| p.wrapping_add(*q)).collect()
        };
        let xor =
            |x: &[u64], y: &[u64]| -> Vec<u64> { x.iter().zip(y).map(|(p, q)| p ^ q).collect() };
        for (i, r) in reqs.iter().enumerate() {
            match *r {
                Req::And { .. } => {
                    let (a, b) = (xor(&m0[i].a, &m1[i].a), xor(&m0[i].b, &m1[i].b));
                    let want: Vec<u64> = a.iter().zip(&b).map(|(p, q)| p & q).collect();
                    assert_eq!(xor(&m0[i].c, &m1[i].c), want, "item {i}");
                    continue;
                }
                Req::AndOwned { n } => {
                    assert!(m0[i].b.is_empty() && m1[i].a.is_empty() && m1[i].b.len() == n);
                    let want: Vec<u64> = m0[i].a.iter().zip(&m1[i].b).map(|(p, q)| p & q).collect();
                    assert_eq!(xor(&m0[i].c, &m1[i].c), want, "item {i}");
                    continue;
                }
                Req::Bits { n } => {
                    let rb = xor(&m0[i].a, &m1[i].a);
                    assert_eq!(rb.len(), bit_words(n));
                    let ra = add(&m0[i].c, &m1[i].c);
                    for (j, v) in ra.iter().enumerate() {
                        assert_eq!(*v, (rb[j / 64] >> (j % 64)) & 1, "bit {j}");
                    }
                    continue;
                }
                _ => {}
            }
            let c = add(&m0[i].c, &m1[i].c);
            let want: Vec<u64> = match *r {
                Req::Mul { .. } => {
                    let (a, b) = (add(&m0[i].a, &m1[i].a), add(&m0[i].b, &m1[i].b));
                    a.iter().zip(&b).map(|(p, q)| p.wrapping_mul(*q)).collect()
                }
                Req::MulRow { cols, .. } => {
                    let (a, b) = (add(&m0[i].a, &m1[i].a), add(&m0[i].b, &m1[i].b));
                    (0..a.len())
                        .map(|j| a[j].wrapping_mul(b[j / cols]))
                        .collect()
                }
                Req::Square { .. } => {
                    let a = add(&m0[i].a, &m1[i].a);
                    a.iter().map(|p| p.wrapping_mul(*p)).collect()
                }
                Req::MatMul { batch, m, k, n } => {
                    let (a, b) = (add(&m0[i].a, &m1[i].a), add(&m0[i].b, &m1[i].b));
                    (0..batch.max(1))
                        .flat_map(|t| {
                            crate::mpc::ring::matmul_u64_naive(
                                &a[t * m * k..(t + 1) * m * k],
                                &b[t * k * n..(t + 1) * k * n],
                                m,
                                k,
                                n,
                            )
                        })
                        .collect()
                }
                Req::WeightMatMul { id, m, k, n } => {
                    let b0 = p0.weight_mask(id, k * n).unwrap();
                    assert!(p1.weight_mask(id, k * n).is_none());
                    crate::mpc::ring::matmul_u64_naive(&m1[i].a, &b0, m, k, n)
                }
                Req::WeightElem { id, cols, .. } => {
                    let b0 = p0.weight_mask(id, cols).unwrap();
                    (0..m1[i].a.len())
                        .map(|j| m1[i].a[j].wrapping_mul(b0[j % cols]))
                        .collect()
                }
                Req::And { .. } | Req::AndOwned { .. } | Req::Bits { .. } => unreachable!(),
            };
            assert_eq!(c, want, "item {i}");
        }
    }
}
