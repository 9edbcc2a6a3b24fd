//! The long-running roles: `mpc dealer` and `mpc serve` (P0) serve sessions one after another
//! and up to `max_sessions` at once, each on its own thread, until SIGTERM or SIGINT. Then they
//! take no new connection and let the running sessions finish.
//!
//! - **Dealer**: a [`SessionBook`] draws each session's two seeds from the OS when the first of
//!   its parties says hello, and hands each role its seed once, over that role's authenticated
//!   link. P1's connection is then served by a [`Dealer`] holding that session's seeds alone.
//! - **P0** ([`Server`]): loads the export and masks its weights once ([`PreparedP0`]). Per
//!   client: the TLS handshake (the certificate must be P1's), the hello (session id, settings
//!   check), a dealer session of its own (told the model's weight seed), the masked weights
//!   sent, then the client's batches.
//!
//! A stray (port scan, failed handshake, garbage) costs a connection thread for at most
//! [`HANDSHAKE_TIMEOUT`] and never a session slot. At most `max_sessions` + [`HANDSHAKE_SLOTS`]
//! connections are handled at once; the rest wait in the kernel's backlog. A client that has
//! said hello while every slot is busy waits for one, up to the timeout.
//!
//! Log lines carry session ids, certificate fingerprints, addresses, shapes, times and byte
//! counts, never a value.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::dealer::{Dealer, Refusal, greet};
use super::model::{PartyReport, PreparedP0, run_prepared_p0};
use super::net::OpStats;
use super::session::{
    Attempt, HANDSHAKE_TIMEOUT, Security, SessionId, Settings, connect_dealer, party_hello,
    server_handshake,
};
use super::share::os_seed;
use super::tls::{Role, peer_fingerprint};
use super::wire::poll_accept;
use super::{MpcError, Party};

/// Connections beyond `max_sessions` that may be in their handshake at once.
pub const HANDSHAKE_SLOTS: usize = 16;
/// How often an idle service looks at its shutdown flag.
const POLL: Duration = Duration::from_millis(100);

/// A flag that ends a service: set by SIGTERM or SIGINT ([`Shutdown::on_signals`]) or by hand.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// A flag that SIGTERM and SIGINT set.
    pub fn on_signals() -> std::io::Result<Self> {
        let s = Self::new();
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, s.0.clone())?;
        }
        Ok(s)
    }

    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How a service runs.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Sessions served at once.
    pub max_sessions: usize,
    /// Per-message timeout of a session, and the longest a client waits for a slot.
    pub timeout: Duration,
    /// Stop after this many sessions have ended (tests); `None`: until shutdown.
    pub stop_after: Option<usize>,
}

/// Counts of what a service did, for its last line.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ServiceTotals {
    pub sessions: usize,
    pub failed: usize,
    pub dropped_connections: usize,
}

/// Accepts connections until `stop()` and hands each to `handle` on its own thread, at most
/// `max_conns` at once. The listener is closed as soon as `stop()` holds (a new client is
/// refused at once rather than left in the backlog); returns when every handler has returned.
fn serve_connections(
    listener: TcpListener,
    role: Role,
    max_conns: usize,
    stop: &(dyn Fn() -> bool + Sync),
    handle: &(dyn Fn(TcpStream, SocketAddr) + Sync),
) {
    struct InFlight<'a>(&'a AtomicUsize);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let inflight = AtomicUsize::new(0);
    std::thread::scope(|s| {
        while !stop() {
            if inflight.load(Ordering::SeqCst) >= max_conns {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            match poll_accept(&listener, Instant::now() + POLL) {
                Ok(None) => {}
                Ok(Some((stream, addr))) => {
                    inflight.fetch_add(1, Ordering::SeqCst);
                    let guard = InFlight(&inflight);
                    s.spawn(move || {
                        let _guard = guard;
                        handle(stream, addr);
                    });
                }
                // Out of descriptors and the like: transient for a service, so wait and go on.
                Err(e) => {
                    eprintln!("{role}: accepting a connection failed: {e}");
                    std::thread::sleep(POLL);
                }
            }
        }
        drop(listener);
    });
}

/// Session slots: at most `n` sessions past their hello at once.
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().expect("slots lock") += 1;
        self.0.cv.notify_one();
    }
}

impl Slots {
    fn new(n: usize) -> Self {
        Self {
            free: Mutex::new(n.max(1)),
            cv: Condvar::new(),
        }
    }

    /// A slot by `deadline`, unless `stop` is set first.
    fn take(&self, deadline: Instant, stop: &Shutdown) -> Option<Slot<'_>> {
        let mut free = self.free.lock().expect("slots lock");
        while *free == 0 {
            let now = Instant::now();
            if now >= deadline || stop.requested() {
                return None;
            }
            free = self
                .cv
                .wait_timeout(free, (deadline - now).min(POLL))
                .expect("slots lock")
                .0;
        }
        *free -= 1;
        Some(Slot(self))
    }
}

/// One line of a service's log, also written as JSON with `--log-json`.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRecord {
    /// `p0` (a session served by `mpc serve`) or `dealer` (P1's link to the dealer).
    pub role: &'static str,
    pub session: String,
    /// The client's certificate fingerprint (`plaintext` without TLS).
    pub client: String,
    pub peer: String,
    pub ok: bool,
    pub error: Option<String>,
    /// `[batch, seq]` of each batch.
    pub shapes: Vec<(usize, usize)>,
    pub setup_s: f64,
    pub offline_s: f64,
    pub online_s: f64,
    pub wall_s: f64,
    pub rounds: u64,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub dealer_bytes: u64,
}

impl std::fmt::Display for SessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shapes: Vec<String> = self
            .shapes
            .iter()
            .map(|(b, s)| format!("{b}x{s}"))
            .collect();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "session {} client {} ({}): ",
            self.session, self.client, self.peer
        )?;
        if self.role == "p0" {
            write!(
                f,
                "{} batches [{}], setup {:.2} s, offline {:.2} s, online {:.2} s, ",
                self.shapes.len(),
                shapes.join(" "),
                self.setup_s,
                self.offline_s,
                self.online_s,
            )?;
        }
        write!(
            f,
            "wall {:.2} s, {} rounds, sent {:.1} MiB, received {:.1} MiB",
            self.wall_s,
            self.rounds,
            mib(self.bytes_sent),
            mib(self.bytes_recv),
        )?;
        match &self.error {
            None => write!(f, ": ok"),
            Some(e) => write!(f, ": FAILED: {e}"),
        }
    }
}

/// Where a service's session lines go: stdout, and a JSONL file if asked.
struct SessionLog {
    json: Option<Mutex<std::fs::File>>,
    totals: Mutex<ServiceTotals>,
}

impl SessionLog {
    fn open(json: Option<&Path>) -> anyhow::Result<Self> {
        let json = match json {
            None => None,
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| anyhow::anyhow!("opening the session log {}: {e}", p.display()))?,
            )),
        };
        Ok(Self {
            json,
            totals: Mutex::new(ServiceTotals::default()),
        })
    }

    fn session(&self, r: &SessionRecord) {
        println!("{r}");
        let _ = std::io::stdout().flush();
        if let Some(f) = &self.json
            && let Ok(line) = serde_json::to_string(r)
        {
            let _ = writeln!(f.lock().expect("log lock"), "{line}");
        }
        let mut t = self.totals.lock().expect("log lock");
        t.sessions += 1;
        t.failed += usize::from(!r.ok);
    }

    fn dropped(&self, role: Role, addr: SocketAddr, e: &MpcError) {
        eprintln!("{role}: dropped a connection from {addr}: {e}");
        self.totals.lock().expect("log lock").dropped_connections += 1;
    }

    fn totals(&self) -> ServiceTotals {
        self.totals.lock().expect("log lock").clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The dealer.
// ---------------------------------------------------------------------------------------------

struct Pending {
    seeds: [[u8; 32]; 2],
    given: [bool; 2],
    /// P0's weight seed, from its hello.
    weight_seed: Option<[u8; 32]>,
    created: Instant,
    done: bool,
}

/// The dealer service's sessions: seeds per session id, each role's handed out once.
pub struct SessionBook {
    sessions: HashMap<SessionId, Pending>,
    max_sessions: usize,
    /// How long a session may wait for its second party.
    ttl: Duration,
}

impl SessionBook {
    pub fn new(max_sessions: usize, ttl: Duration) -> Self {
        Self {
            sessions: HashMap::new(),
            max_sessions: max_sessions.max(1),
            ttl,
        }
    }

    /// Forgets ended sessions and those whose P1 never came within the ttl (P1's link is the
    /// one that lasts; P0 takes its seed and goes).
    fn purge(&mut self) {
        let ttl = self.ttl;
        self.sessions
            .retain(|_, p| !p.done && (p.given[1] || p.created.elapsed() < ttl));
    }

    /// Sessions begun and not ended.
    pub fn live(&self) -> usize {
        self.sessions.len()
    }

    /// `party`'s seed for `session`; the session is opened by its first hello, while fewer
    /// than `max_sessions` are live.
    pub fn claim(
        &mut self,
        party: Party,
        session: SessionId,
        weight_seed: Option<[u8; 32]>,
    ) -> std::result::Result<[u8; 32], Refusal> {
        self.purge();
        if !self.sessions.contains_key(&session) && self.sessions.len() >= self.max_sessions {
            return Err(Refusal::Busy);
        }
        let p = self.sessions.entry(session).or_insert_with(|| Pending {
            seeds: [os_seed(), os_seed()],
            given: [false; 2],
            weight_seed: None,
            created: Instant::now(),
            done: false,
        });
        if p.given[party.index()] {
            return Err(Refusal::AlreadyServed);
        }
        p.given[party.index()] = true;
        if party == Party::P0 {
            p.weight_seed = weight_seed;
        }
        Ok(p.seeds[party.index()])
    }

    /// A dealer for P1's link of `session`, once its P0 has named its weight seed; `Err` with
    /// the reason to wait no longer (`Ok(None)`: not yet).
    fn dealer(&self, session: SessionId) -> std::result::Result<Option<Dealer>, &'static str> {
        let p = self.sessions.get(&session).ok_or("the session has ended")?;
        Ok(p.weight_seed
            .map(|ws| Dealer::from_seeds(p.seeds).with_weight_seed(ws)))
    }

    fn end(&mut self, session: SessionId) {
        if let Some(p) = self.sessions.get_mut(&session) {
            p.done = true;
        }
        self.purge();
    }
}

/// `mpc dealer`: serves sessions on `listener` until `shutdown` (or `opts.stop_after`).
pub fn run_dealer(
    listener: TcpListener,
    sec: &Security,
    opts: &ServiceOptions,
    shutdown: &Shutdown,
    log_json: Option<&Path>,
) -> anyhow::Result<ServiceTotals> {
    let log = SessionLog::open(log_json)?;
    let book = Mutex::new(SessionBook::new(opts.max_sessions, opts.timeout));
    let stop =
        || shutdown.requested() || opts.stop_after.is_some_and(|n| log.totals().sessions >= n);
    let handle = |stream: TcpStream, addr: SocketAddr| {
        dealer_connection(stream, addr, sec, opts, &book, &log);
    };
    serve_connections(
        listener,
        Role::Dealer,
        opts.max_sessions + HANDSHAKE_SLOTS,
        &stop,
        &handle,
    );
    Ok(log.totals())
}

/// One connection to the dealer service: a party's hello, and for P1 its session's requests.
fn dealer_connection(
    stream: TcpStream,
    addr: SocketAddr,
    sec: &Security,
    opts: &ServiceOptions,
    book: &Mutex<SessionBook>,
    log: &SessionLog,
) {
    let me = Role::Dealer;
    let started = Instant::now();
    let (mut chan, role) =
        match server_handshake(stream, addr, sec, me, &[Role::P0, Role::P1], opts.timeout) {
            Ok(Attempt::Done(c)) => c,
            Ok(Attempt::Stray(e)) | Err(e) => return log.dropped(me, addr, &e),
        };
    let client = chan
        .tls_connection()
        .and_then(peer_fingerprint)
        .unwrap_or_else(|| "plaintext".into());
    chan.set_timeout(HANDSHAKE_TIMEOUT.min(opts.timeout));
    // The book is locked for the claim only, not while the hello travels.
    let mut claim = |p, s, w| book.lock().expect("book lock").claim(p, s, w);
    let (party, session) = match greet(&mut chan, role.and_then(Role::party), &mut claim) {
        Ok((p, s, _)) => (p, s),
        Err(e) => return log.dropped(me, addr, &e),
    };
    if party == Party::P0 {
        return;
    }
    chan.set_timeout(opts.timeout);
    // P1 may say hello before its P0: wait for P0's weight seed (P1 asks for nothing before P0
    // has sent it the masked weights, which P0 does only after its own hello).
    let by = Instant::now() + opts.timeout;
    let mut dealer = loop {
        match book.lock().expect("book lock").dealer(session) {
            Ok(Some(d)) => break Ok(d),
            Ok(None) if Instant::now() < by => {}
            Ok(None) => break Err("P0 did not come within the timeout"),
            Err(why) => break Err(why),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let r = match &mut dealer {
        Ok(d) => d.serve(&mut chan),
        Err(why) => Err(MpcError::Dealer(why.to_string())),
    };
    let stats = dealer.map(|d| d.stats).unwrap_or_default();
    book.lock().expect("book lock").end(session);
    let s = &stats;
    log.session(&SessionRecord {
        role: "dealer",
        session: session.short(),
        client,
        peer: addr.to_string(),
        ok: r.is_ok(),
        error: r.err().map(|e| e.to_string()),
        shapes: Vec::new(),
        setup_s: 0.0,
        offline_s: 0.0,
        online_s: 0.0,
        wall_s: started.elapsed().as_secs_f64(),
        rounds: s.rounds,
        bytes_sent: s.bytes_sent,
        bytes_recv: s.bytes_recv,
        dealer_bytes: 0,
    });
}

// ---------------------------------------------------------------------------------------------
// P0.
// ---------------------------------------------------------------------------------------------

/// `mpc serve`: P0 with one export, loaded and masked once, serving clients.
pub struct Server {
    pub prepared: PreparedP0,
    pub sec: Security,
    /// The dealer's address.
    pub dealer: String,
    pub opts: ServiceOptions,
}

impl Server {
    /// Serves clients on `listener` until `shutdown` (or `opts.stop_after`).
    pub fn run(
        &self,
        listener: TcpListener,
        shutdown: &Shutdown,
        log_json: Option<&Path>,
    ) -> anyhow::Result<ServiceTotals> {
        let log = SessionLog::open(log_json)?;
        let settings = self.prepared.model.cfg.settings();
        let slots = Slots::new(self.opts.max_sessions);
        let stop = || {
            shutdown.requested()
                || self
                    .opts
                    .stop_after
                    .is_some_and(|n| log.totals().sessions >= n)
        };
        let handle = |stream: TcpStream, addr: SocketAddr| {
            self.session(stream, addr, &settings, &slots, shutdown, &log);
        };
        serve_connections(
            listener,
            Role::P0,
            self.opts.max_sessions + HANDSHAKE_SLOTS,
            &stop,
            &handle,
        );
        Ok(log.totals())
    }

    /// One client: handshake, hello, a slot, the dealer, the session; one log line.
    fn session(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
        settings: &Settings,
        slots: &Slots,
        shutdown: &Shutdown,
        log: &SessionLog,
    ) {
        let me = Role::P0;
        let timeout = self.opts.timeout;
        let started = Instant::now();
        let (mut chan, _) =
            match server_handshake(stream, addr, &self.sec, me, &[Role::P1], timeout) {
                Ok(Attempt::Done(c)) => c,
                Ok(Attempt::Stray(e)) | Err(e) => return log.dropped(me, addr, &e),
            };
        let client = chan
            .tls_connection()
            .and_then(peer_fingerprint)
            .unwrap_or_else(|| "plaintext".into());
        let sid = match party_hello(&mut chan, Party::P0, settings, timeout) {
            Ok(Attempt::Done(sid)) => sid,
            Ok(Attempt::Stray(e)) | Err(e) => return log.dropped(me, addr, &e),
        };
        let mut record = SessionRecord {
            role: "p0",
            session: sid.short(),
            client,
            peer: addr.to_string(),
            ok: false,
            error: None,
            shapes: Vec::new(),
            setup_s: 0.0,
            offline_s: 0.0,
            online_s: 0.0,
            wall_s: 0.0,
            rounds: 0,
            bytes_sent: 0,
            bytes_recv: 0,
            dealer_bytes: 0,
        };
        let result = match slots.take(Instant::now() + timeout, shutdown) {
            None => Err(MpcError::Config(
                "no session slot came free within the timeout (or the server is stopping)".into(),
            )),
            Some(_slot) => {
                let ws = Some(self.prepared.weight_seed);
                connect_dealer(&self.dealer, &self.sec, Party::P0, sid, ws, timeout)
                    .and_then(|dealer| run_prepared_p0(&self.prepared, Box::new(chan), dealer))
            }
        };
        record.wall_s = started.elapsed().as_secs_f64();
        match result {
            Ok(r) => fill(&mut record, &r),
            Err(e) => record.error = Some(e.to_string()),
        }
        log.session(&record);
    }
}

/// A party's report into its log line.
fn fill(record: &mut SessionRecord, r: &PartyReport) {
    let mut t = OpStats::default();
    for (_, s) in &r.ops {
        t.add(s);
    }
    record.ok = true;
    record.shapes = r.shapes.clone();
    record.setup_s = r.setup_s;
    record.offline_s = r.offline_s;
    record.online_s = r.forward_s;
    record.rounds = t.rounds;
    record.bytes_sent = t.bytes_sent;
    record.bytes_recv = t.bytes_recv;
    record.dealer_bytes = t.dealer_bytes;
}
