//! Setting up a session: who is at the end of each link, which session it is, and whether both
//! parties run the same settings — all before any share, seed or masked weight is sent.
//!
//! 1. **P1 → P0.** P1 connects to P0 (TLS: P0's certificate must be `p0.mpcformer`, P1's
//!    `p1.mpcformer`). Each sends a hello: protocol version, its role, 16 random bytes and the
//!    digests of every setting that must match ([`Settings`]). The session id is
//!    `SHA-256(label ‖ nonce0 ‖ nonce1)` ([`SessionId`]): neither party alone chooses it. A
//!    digest mismatch is an error on both sides, naming the settings that differ.
//! 2. **Parties → dealer.** Each party connects to the dealer (whose certificate must be
//!    `dealer.mpcformer`) and sends the session id; the dealer takes the party's role from its
//!    certificate, never from the message, and hands each role's seed at most once, to
//!    connections of one session only (see [`serve_dealer`], [`super::dealer::Dealer::greet`]).
//!
//! A listener survives strays: a connection that fails the TLS handshake, presents a
//! certificate of the wrong role, or (plaintext) does not open with a well-formed hello within
//! [`HANDSHAKE_TIMEOUT`] is dropped with a line on stderr, and the listener waits for the next.
//! Under `--insecure-plaintext` nothing is authenticated: roles are what connections claim.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::dealer::{Dealer, DealerClient};
use super::net::{Channel, TcpChannel, Transport};
use super::share::os_seed;
use super::tls::{Role, TlsIdentity, peer_role};
use super::wire::{accept_stream, connect_stream};
use super::{MpcError, Party, Result};

/// Version of the session and dealer messages; both ends must agree.
pub const PROTOCOL_VERSION: u64 = 3;
/// Time a new connection has to finish its TLS handshake and hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Words of the largest hello accepted (the real ones have a few dozen).
const MAX_HELLO_WORDS: u64 = 256;
const PARTY_HELLO: u64 = u64::from_le_bytes(*b"mpcf-p2p");

/// How links are protected.
#[derive(Debug, Clone)]
pub enum Security {
    /// Mutual TLS 1.3 with this role's identity.
    Tls(Arc<TlsIdentity>),
    /// `--insecure-plaintext`: loopback benchmarks and tests only.
    Plaintext,
}

impl Security {
    pub fn transport(&self) -> Transport {
        match self {
            Security::Tls(_) => Transport::Tls13,
            Security::Plaintext => Transport::Plaintext,
        }
    }
}

/// The session both parties agreed on. Public (the dealer and both parties know it); `Debug`
/// shows a prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 32]);

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionId({}…)", self.short())
    }
}

impl SessionId {
    /// The first 8 hex digits, for log lines (the id is public).
    pub fn short(&self) -> String {
        self.0[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_nonces(n0: &[u64], n1: &[u64]) -> Self {
        let mut h = Sha256::new();
        h.update(b"mpcformer session id v2");
        for w in n0.iter().chain(n1) {
            h.update(w.to_le_bytes());
        }
        Self(h.finalize().into())
    }

    pub fn to_words(self) -> [u64; 4] {
        bytes_to_words(&self.0)
    }

    pub fn from_words(w: &[u64]) -> Option<Self> {
        (w.len() == 4).then(|| Self(words_to_bytes(w)))
    }
}

fn bytes_to_words(b: &[u8; 32]) -> [u64; 4] {
    std::array::from_fn(|i| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes")))
}

fn words_to_bytes(w: &[u64]) -> [u8; 32] {
    let mut b = [0u8; 32];
    for (i, x) in w.iter().take(4).enumerate() {
        b[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes());
    }
    b
}

/// Digests of the settings both parties must share, each under a name the mismatch error shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub parts: Vec<(&'static str, [u8; 32])>,
}

impl Settings {
    /// A digest per named part, over that part's canonical bytes.
    pub fn new(parts: &[(&'static str, &[u8])]) -> Self {
        Self {
            parts: parts
                .iter()
                .map(|(name, bytes)| {
                    let mut h = Sha256::new();
                    h.update(name.as_bytes());
                    h.update([0]);
                    h.update(bytes);
                    (*name, h.finalize().into())
                })
                .collect(),
        }
    }

    /// Names of the parts whose digests differ from `theirs` (every part if the lists differ in
    /// length).
    fn differing(&self, theirs: &[[u8; 32]]) -> Vec<&'static str> {
        if theirs.len() != self.parts.len() {
            return self.parts.iter().map(|p| p.0).collect();
        }
        self.parts
            .iter()
            .zip(theirs)
            .filter(|((_, a), b)| a != *b)
            .map(|p| p.0.0)
            .collect()
    }
}

pub(super) fn session_err(
    role: Role,
    peer: &str,
    step: &str,
    reason: impl std::fmt::Display,
) -> MpcError {
    MpcError::Session {
        role: role.to_string(),
        peer: peer.to_string(),
        step: step.to_string(),
        reason: reason.to_string(),
    }
}

/// Connects to the `server` role at `addr` as `me`: TCP (retried until `timeout`), then the TLS
/// handshake, which checks the server's certificate is `server`'s.
pub fn connect(
    addr: &str,
    sec: &Security,
    me: Role,
    server: Role,
    timeout: Duration,
) -> Result<TcpChannel> {
    let stream = connect_stream(addr, timeout)
        .map_err(|e| session_err(me, addr, &format!("connecting to {server}"), e))?;
    match sec {
        Security::Plaintext => TcpChannel::from_stream(stream, timeout),
        Security::Tls(id) => {
            // The whole timeout, not HANDSHAKE_TIMEOUT: the server may first be busy dropping a
            // stray that holds its handshake open.
            let by = Instant::now() + timeout;
            TcpChannel::tls(stream, id.client_conn(server)?, timeout, by)
                .map_err(|e| session_err(me, addr, &format!("TLS handshake with {server}"), e))
        }
    }
}

/// What became of one accepted connection.
pub(super) enum Attempt<T> {
    /// The peer we wait for.
    Done(T),
    /// Not it (a scan, garbage, a failed handshake, a refused hello): dropped.
    Stray(MpcError),
}

/// Accepts connections on `listener` until `try_one` takes one, dropping strays, until
/// `deadline`. An `Err` from `try_one` ends the wait (the right peer, but the session fails).
fn accept_until<T>(
    listener: &TcpListener,
    me: Role,
    deadline: Instant,
    mut try_one: impl FnMut(std::net::TcpStream, SocketAddr) -> Result<Attempt<T>>,
) -> Result<T> {
    loop {
        let (stream, addr) = accept_stream(listener, deadline)?;
        match try_one(stream, addr)? {
            Attempt::Done(t) => return Ok(t),
            Attempt::Stray(e) => eprintln!("{me}: dropped a connection from {addr}: {e}"),
        }
    }
}

/// The server side of one connection: TLS handshake (if any) and the client's role. Under TLS
/// the role comes from the certificate and must be one of `allowed`; in plaintext it is unknown.
pub(super) fn server_handshake(
    stream: std::net::TcpStream,
    addr: SocketAddr,
    sec: &Security,
    me: Role,
    allowed: &[Role],
    timeout: Duration,
) -> Result<Attempt<(TcpChannel, Option<Role>)>> {
    let peer = addr.to_string();
    let chan = match sec {
        Security::Plaintext => TcpChannel::from_stream(stream, timeout)?,
        Security::Tls(id) => {
            let by = Instant::now() + HANDSHAKE_TIMEOUT.min(timeout);
            match TcpChannel::tls(stream, id.server_conn()?, timeout, by) {
                Ok(c) => c,
                Err(e) => return Ok(Attempt::Stray(session_err(me, &peer, "TLS handshake", e))),
            }
        }
    };
    let role = match chan.tls_connection() {
        None => None,
        Some(conn) => match peer_role(conn, allowed) {
            Some(r) => Some(r),
            None => {
                let want: Vec<String> = allowed.iter().map(|r| r.dns_name().to_string()).collect();
                let why = format!("its certificate is not valid for {}", want.join(" or "));
                return Ok(Attempt::Stray(session_err(me, &peer, "peer role", why)));
            }
        },
    };
    Ok(Attempt::Done((chan, role)))
}

/// A party's hello to the other party.
struct PartyHello {
    role: u64,
    nonce: [u64; 2],
    digests: Vec<[u8; 32]>,
}

impl PartyHello {
    fn ours(party: Party, settings: &Settings) -> Self {
        let n = bytes_to_words(&os_seed());
        Self {
            role: party.index() as u64,
            nonce: [n[0], n[1]],
            digests: settings.parts.iter().map(|p| p.1).collect(),
        }
    }

    fn encode(&self) -> Vec<u64> {
        let mut w = vec![
            PARTY_HELLO,
            PROTOCOL_VERSION,
            self.role,
            self.nonce[0],
            self.nonce[1],
        ];
        w.push(self.digests.len() as u64);
        for d in &self.digests {
            w.extend(bytes_to_words(d));
        }
        w
    }

    /// `Err(reason)` for anything but a well-formed hello of this protocol version.
    fn decode(w: &[u64]) -> std::result::Result<Self, String> {
        if w.first() != Some(&PARTY_HELLO) {
            return Err("not an mpcformer hello".into());
        }
        match w.get(1) {
            Some(&PROTOCOL_VERSION) => {}
            v => {
                return Err(format!(
                    "protocol version {v:?}, this build speaks {PROTOCOL_VERSION}"
                ));
            }
        }
        let parts = w.get(5).map(|&n| n as usize).ok_or("truncated hello")?;
        if parts.checked_mul(4).and_then(|x| x.checked_add(6)) != Some(w.len()) {
            return Err("malformed hello".into());
        }
        Ok(Self {
            role: w[2],
            nonce: [w[3], w[4]],
            digests: w[6..].chunks_exact(4).map(words_to_bytes).collect(),
        })
    }
}

/// One hello each way. The client (P1) speaks first, so P0 says nothing to a connection that
/// does not open with an mpcformer hello (`Err`: a stray).
fn hello_round(chan: &mut TcpChannel, me: Party, ours: &PartyHello) -> Result<Vec<u64>> {
    match me {
        Party::P1 => {
            chan.send("hello", &ours.encode())?;
            chan.recv_max("hello", MAX_HELLO_WORDS)
        }
        Party::P0 => {
            let got = chan.recv_max("hello", MAX_HELLO_WORDS)?;
            if got.first() != Some(&PARTY_HELLO) {
                return Err(MpcError::Config("not an mpcformer hello".into()));
            }
            chan.send("hello", &ours.encode())?;
            Ok(got)
        }
    }
}

/// Exchanges hellos over an established link and returns the session id. A failed exchange is
/// a stray; a hello of another version or role, or other settings, is an error on both sides
/// (both hellos are sent before either side checks), naming what differs.
pub(super) fn party_hello(
    chan: &mut TcpChannel,
    me: Party,
    settings: &Settings,
    timeout: Duration,
) -> Result<Attempt<SessionId>> {
    let ours = PartyHello::ours(me, settings);
    chan.set_timeout(HANDSHAKE_TIMEOUT.min(timeout));
    let got = hello_round(chan, me, &ours);
    chan.set_timeout(timeout);
    let peer = chan.peer_addr().to_string();
    let fail = |why: String| session_err(me.into(), &peer, "hello", why);
    let words = match got {
        Ok(w) => w,
        Err(e) => return Ok(Attempt::Stray(fail(e.to_string()))),
    };
    let theirs = PartyHello::decode(&words).map_err(fail)?;
    let want = me.peer().index() as u64;
    if theirs.role != want {
        return Err(fail(format!(
            "the hello claims role {}, expected {want}",
            theirs.role
        )));
    }
    let differ = settings.differing(&theirs.digests);
    if !differ.is_empty() {
        return Err(session_err(
            me.into(),
            &peer,
            "settings check",
            format!(
                "settings differ from {}'s: {} (both parties must load the same model, variant and options)",
                Role::from(me.peer()),
                differ.join(", ")
            ),
        ));
    }
    let (n0, n1) = match me {
        Party::P0 => (ours.nonce, theirs.nonce),
        Party::P1 => (theirs.nonce, ours.nonce),
    };
    Ok(Attempt::Done(SessionId::from_nonces(&n0, &n1)))
}

/// P0: waits on `listener` for P1 (dropping strays) and runs the hello.
pub fn accept_p1(
    listener: &TcpListener,
    sec: &Security,
    settings: &Settings,
    timeout: Duration,
) -> Result<(TcpChannel, SessionId)> {
    let me = Role::P0;
    accept_until(listener, me, Instant::now() + timeout, |stream, addr| {
        let (mut chan, _) = match server_handshake(stream, addr, sec, me, &[Role::P1], timeout)? {
            Attempt::Done(c) => c,
            Attempt::Stray(e) => return Ok(Attempt::Stray(e)),
        };
        Ok(
            match party_hello(&mut chan, Party::P0, settings, timeout)? {
                Attempt::Done(sid) => Attempt::Done((chan, sid)),
                Attempt::Stray(e) => Attempt::Stray(e),
            },
        )
    })
}

/// P1: connects to P0 at `addr` and runs the hello.
pub fn connect_p0(
    addr: &str,
    sec: &Security,
    settings: &Settings,
    timeout: Duration,
) -> Result<(TcpChannel, SessionId)> {
    let mut chan = connect(addr, sec, Role::P1, Role::P0, timeout)?;
    match party_hello(&mut chan, Party::P1, settings, timeout)? {
        Attempt::Done(sid) => Ok((chan, sid)),
        Attempt::Stray(e) => Err(e),
    }
}

/// A party: connects to the dealer at `addr` and receives its seed for session `sid`. P0 names
/// the seed of its weight masks (`None`: a fresh one; `mpc serve` keeps one per model).
pub fn connect_dealer(
    addr: &str,
    sec: &Security,
    party: Party,
    sid: SessionId,
    weight_seed: Option<[u8; 32]>,
    timeout: Duration,
) -> Result<DealerClient> {
    let chan = connect(addr, sec, party.into(), Role::Dealer, timeout)?;
    DealerClient::connect(party, Box::new(chan), sid, weight_seed)
        .map_err(|e| session_err(party.into(), addr, "dealer hello", e))
}

/// The dealer: accepts both parties of one session on `listener` (dropping strays and refused
/// hellos), hands each its seed, then answers P1's requests until P1 is done. Waits at most
/// `timeout` for the parties.
pub fn serve_dealer(
    listener: &TcpListener,
    sec: &Security,
    dealer: &mut Dealer,
    timeout: Duration,
) -> Result<()> {
    let me = Role::Dealer;
    let deadline = Instant::now() + timeout;
    let mut p1 = None;
    while !dealer.all_seeds_given() {
        let chan = accept_until(listener, me, deadline, |stream, addr| {
            let (mut chan, role) =
                match server_handshake(stream, addr, sec, me, &[Role::P0, Role::P1], timeout)? {
                    Attempt::Done(c) => c,
                    Attempt::Stray(e) => return Ok(Attempt::Stray(e)),
                };
            chan.set_timeout(HANDSHAKE_TIMEOUT.min(timeout));
            let authenticated = role.and_then(Role::party);
            match dealer.greet(&mut chan, authenticated) {
                Ok(party) => {
                    chan.set_timeout(timeout);
                    Ok(Attempt::Done((party, chan)))
                }
                Err(e) => Ok(Attempt::Stray(session_err(
                    me,
                    &addr.to_string(),
                    "hello",
                    e,
                ))),
            }
        })?;
        if let (Party::P1, c) = chan {
            p1 = Some(c);
        }
    }
    let mut p1 = p1.expect("P1's seed was given over this link");
    let peer = p1.peer_addr().to_string();
    dealer
        .serve(&mut p1)
        .map_err(|e| session_err(me, &peer, "serving P1", e))
}
