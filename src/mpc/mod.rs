//! Two-party secure inference: the engine's foundation layers (issue 8) and the comparison-based
//! functions of the teacher (issue 9).
//!
//! # Setting
//!
//! The same as CrypTen's, so that figures compare:
//!
//! - **Two semi-honest computing parties.** P0 owns the model (the weights), P1 owns the input
//!   (token ids). Both follow the protocol and try to learn from what they see; neither deviates.
//! - **A dealer (trusted third party)** supplies correlated randomness (Beaver triples, matrix
//!   triples, square pairs) and takes no other part. It shares one PRG seed with each party: P0
//!   derives *all* its shares from its seed, P1 derives its shares of the masks from its seed, and
//!   only P1's share of each product (`c = a·b`, `r²`) crosses the wire. The dealer's traffic is
//!   therefore one ring element per product element and is counted apart from the parties'.
//!   See [`dealer`].
//! - **Additive secret sharing over Z_2^64**: `x = x0 + x1 (mod 2^64)` with `u64` wrapping
//!   arithmetic; party `i` holds `x_i`. Each share alone is uniform and independent of `x`.
//!   See [`share`].
//! - **Fixed point**: a real `v` is encoded as the two's-complement ring element
//!   `round(v · 2^f)`, with `f` fractional bits ([`DEFAULT_FRAC_BITS`] = 16, configurable through
//!   [`ring::FixedPoint`]). A product of two encoded values carries `2f` fractional bits and is
//!   brought back by the exact truncation of [`trunc`] wherever one value per element is
//!   truncated (1 round, one bit per element each way; never a large error), elsewhere by
//!   SecureML's local probabilistic truncation (0 rounds; error bound in
//!   [`share::AShare::truncate`]).
//!
//! # Layers (each tested alone, CrypTen style)
//!
//! 1. [`ring`]: fixed-point encode/decode, [`ring::RingTensor`] and its local ops, the
//!    cache-blocked wrapping `u64` matmul (the hot loop).
//! 2. [`share`]: share/reconstruct, local ops on shares, truncation; [`trunc`]: the exact
//!    truncation (issue 16).
//! 3. [`dealer`]: correlated randomness from PRG seeds.
//! 4. [`net`]: the [`net::Channel`] trait, an in-process pair and TCP ([`wire`]) with
//!    length-prefixed frames, bounded before allocation, and per-frame deadlines; rounds and bytes
//!    counted per op; LAN/WAN time model. [`tls`]: mutual TLS 1.3 with a role per certificate
//!    (`mpc certs`); [`session`]: session id, settings check and the dealer's seed hand-out,
//!    none of which a connection can impersonate.
//! 5. [`protocols`]: Beaver multiply, square and matmul (one round each), reveal; weight
//!    products with per-model masks; binary AND (AND triples, owned AND triples) and B2A of bits
//!    (shared random bits) as rounds of the same kind; Quad, 2Quad, reciprocal, inverse square
//!    root, LayerNorm, tanh.
//!    [`compare`]: comparison on binary shares (`ltz`: free A2B of the two additive shares, a
//!    packed log-depth carry tree, B2A; 8 rounds, ≈ 40 bytes per element per party), ReLU, row
//!    max, exp (`(1 + x/2^n)^(2^n)`), BERT's masked softmax, GeLU (piecewise: exact tails,
//!    a degree-16 even polynomial inside ±4), 2ReLU. Every new round runs from offline
//!    material like the others.
//! 6. [`model`]: an exported model under MPC — the teacher (GeLU + softmax) or any student
//!    (Quad / ReLU, 2Quad / 2ReLU / softmax, per layer), BERT or RoBERTa; sessions in-process
//!    or over TCP; [`cli`]: `mpcformer mpc run` / `mpc bench` (`--variants`, `--seq` lists:
//!    per-op table and speedups over the teacher).
//! 7. [`service`]: the long-running roles, `mpc dealer` and `mpc serve` (P0): many sessions,
//!    one after another and at once, each with its own dealer session; strays, dead clients and
//!    SIGTERM handled. [`client`]: `mpc client` (P1): local tokenisation, bucketed batches,
//!    labels and probabilities.
//!
//! # What may be printed
//!
//! No log line, error or panic message carries a plaintext input, a share or a weight: errors name
//! shapes, op labels and byte counts only, and the `Debug` impls of [`ring::RingTensor`] and
//! [`share::AShare`] print the shape, never the data.

pub mod cli;
pub mod client;
pub mod compare;
pub mod dealer;
pub mod model;
pub mod net;
pub mod protocols;
pub mod ring;
pub mod service;
pub mod session;
pub mod share;
pub mod tls;
pub mod trunc;
pub mod wire;

use std::time::Duration;

use thiserror::Error;

/// Fractional bits of the fixed-point encoding unless configured otherwise (CrypTen's default).
pub const DEFAULT_FRAC_BITS: u32 = 16;

/// One of the two computing parties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Party {
    /// P0: holds the model. Adds public constants to its share.
    P0,
    /// P1: holds the input.
    P1,
}

impl Party {
    /// 0 for P0, 1 for P1.
    pub fn index(self) -> usize {
        match self {
            Party::P0 => 0,
            Party::P1 => 1,
        }
    }

    /// The party with index `i` (0 or 1); `None` otherwise.
    pub fn from_index(i: usize) -> Option<Self> {
        match i {
            0 => Some(Party::P0),
            1 => Some(Party::P1),
            _ => None,
        }
    }

    /// The other party.
    pub fn peer(self) -> Self {
        match self {
            Party::P0 => Party::P1,
            Party::P1 => Party::P0,
        }
    }
}

/// Errors of the MPC engine. Messages carry shapes, op labels, counts and durations only — never
/// a value, a share or a weight.
#[derive(Debug, Error)]
pub enum MpcError {
    #[error("{op}: shape mismatch, {lhs:?} vs {rhs:?}")]
    Shape {
        op: String,
        lhs: Vec<usize>,
        rhs: Vec<usize>,
    },
    #[error("{op}: data length {len} does not match shape {shape:?}")]
    Length {
        op: String,
        shape: Vec<usize>,
        len: usize,
    },
    #[error("{op}: operands belong to different parties")]
    PartyMismatch { op: String },
    #[error("op '{op}': the peer closed the connection")]
    PeerClosed { op: String },
    #[error("op '{op}': no message from the peer within {timeout:?}; the peer is gone or stalled")]
    Timeout { op: String, timeout: Duration },
    #[error("op '{op}': I/O error: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("op '{op}': received a frame of {got} words, expected {expected}")]
    FrameLength {
        op: String,
        expected: usize,
        got: usize,
    },
    #[error("op '{op}': frame header announces {words} words, above the limit of {limit}")]
    FrameTooLarge { op: String, words: u64, limit: u64 },
    #[error("connecting to {addr}: no connection within {timeout:?}: {source}")]
    Connect {
        addr: String,
        timeout: Duration,
        #[source]
        source: std::io::Error,
    },
    #[error("dealer: {0}")]
    Dealer(String),
    #[error("{role}: {step} with {peer}: {reason}")]
    Session {
        role: String,
        peer: String,
        step: String,
        reason: String,
    },
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}: unsupported under MPC")]
    Unsupported(String),
}

/// Result with [`MpcError`].
pub type Result<T, E = MpcError> = std::result::Result<T, E>;
