//! Transport between the parties (and between P1 and the dealer), with every message counted.
//!
//! - [`Channel`]: send / receive whole frames of ring words, and [`Channel::exchange`] (send and
//!   receive at once — what one round of a symmetric protocol does).
//! - [`MemChannel`]: an in-process pair (std `mpsc`) for tests, with the same timeout semantics.
//! - [`TcpChannel`] ([`super::wire`]): length-prefixed frames over TCP, plaintext or mutual
//!   TLS 1.3, each frame with a deadline: a peer that vanishes gives [`MpcError::PeerClosed`],
//!   one that stalls [`MpcError::Timeout`]; a header above what the receiver expects is refused
//!   before anything is allocated.
//! - [`Net`]: a channel plus [`Stats`]: rounds, bytes sent and received, wall time, per op label.
//! - [`NetModel`]: LAN / WAN time from rounds and bytes.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use super::wire::{TcpChannel, Transport};
use super::{MpcError, Result};

/// Bytes of a frame header (the word count).
pub const FRAME_HEADER_BYTES: u64 = 8;
/// Largest frame accepted by default: 2^31 words (16 GiB; the word-embedding weight of a large
/// vocabulary is the biggest legitimate frame). A frame whose length is not known in advance
/// grows its buffer only as its bytes arrive, so the cap bounds what a peer can make us hold,
/// never what a header alone reserves.
pub const DEFAULT_MAX_FRAME_WORDS: u64 = 1 << 31;
/// Default timeout for a single receive / send / connect.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A bidirectional, ordered, reliable stream of frames of `u64` words.
pub trait Channel: Send {
    /// Sends one frame. `op` labels errors.
    fn send(&mut self, op: &str, words: &[u64]) -> Result<()>;
    /// Receives one frame.
    fn recv(&mut self, op: &str) -> Result<Vec<u64>>;
    /// Receives a frame that must hold exactly `n` words: a header announcing another length
    /// is refused before the body is read.
    fn recv_exact(&mut self, op: &str, n: usize) -> Result<Vec<u64>> {
        check_len(op, self.recv(op)?, n)
    }
    /// Receives a frame of at most `max_words` words (refused from its header otherwise).
    fn recv_max(&mut self, op: &str, max_words: u64) -> Result<Vec<u64>> {
        let got = self.recv(op)?;
        if got.len() as u64 > max_words {
            return Err(MpcError::FrameTooLarge {
                op: op.into(),
                words: got.len() as u64,
                limit: max_words,
            });
        }
        Ok(got)
    }
    /// Sends `words` and receives the peer's frame of the same round. The default sends first:
    /// right for channels whose send never blocks on the peer reading.
    fn exchange(&mut self, op: &str, words: &[u64]) -> Result<Vec<u64>> {
        self.send(op, words)?;
        self.recv(op)
    }
    /// [`Channel::exchange`] where the peer's frame must hold exactly `n` words.
    fn exchange_exact(&mut self, op: &str, words: &[u64], n: usize) -> Result<Vec<u64>> {
        check_len(op, self.exchange(op, words)?, n)
    }
}

fn check_len(op: &str, got: Vec<u64>, n: usize) -> Result<Vec<u64>> {
    if got.len() != n {
        return Err(MpcError::FrameLength {
            op: op.into(),
            expected: n,
            got: got.len(),
        });
    }
    Ok(got)
}

impl Channel for Box<dyn Channel> {
    fn send(&mut self, op: &str, words: &[u64]) -> Result<()> {
        (**self).send(op, words)
    }
    fn recv(&mut self, op: &str) -> Result<Vec<u64>> {
        (**self).recv(op)
    }
    fn recv_exact(&mut self, op: &str, n: usize) -> Result<Vec<u64>> {
        (**self).recv_exact(op, n)
    }
    fn recv_max(&mut self, op: &str, max_words: u64) -> Result<Vec<u64>> {
        (**self).recv_max(op, max_words)
    }
    fn exchange(&mut self, op: &str, words: &[u64]) -> Result<Vec<u64>> {
        (**self).exchange(op, words)
    }
    fn exchange_exact(&mut self, op: &str, words: &[u64], n: usize) -> Result<Vec<u64>> {
        (**self).exchange_exact(op, words, n)
    }
}

// ---------------------------------------------------------------------------------------------
// In-process pair.
// ---------------------------------------------------------------------------------------------

/// One end of an in-process channel pair (unbounded queues, so sends never block).
pub struct MemChannel {
    tx: Sender<Vec<u64>>,
    rx: Receiver<Vec<u64>>,
    timeout: Duration,
}

/// Two connected in-process ends; a receive waits at most `timeout`.
pub fn mem_pair(timeout: Duration) -> (MemChannel, MemChannel) {
    let (t0, r1) = channel();
    let (t1, r0) = channel();
    (
        MemChannel {
            tx: t0,
            rx: r0,
            timeout,
        },
        MemChannel {
            tx: t1,
            rx: r1,
            timeout,
        },
    )
}

impl Channel for MemChannel {
    fn send(&mut self, op: &str, words: &[u64]) -> Result<()> {
        self.tx
            .send(words.to_vec())
            .map_err(|_| MpcError::PeerClosed { op: op.into() })
    }
    fn recv(&mut self, op: &str) -> Result<Vec<u64>> {
        self.rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => MpcError::Timeout {
                op: op.into(),
                timeout: self.timeout,
            },
            RecvTimeoutError::Disconnected => MpcError::PeerClosed { op: op.into() },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Counting.
// ---------------------------------------------------------------------------------------------

/// Counters of one op label (or of the whole run).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OpStats {
    /// Communication rounds (a frame sent and/or received between the parties).
    pub rounds: u64,
    /// Bytes this party sent to / received from the other party (frame headers included).
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    /// Bytes between this party and the dealer (requests and correlated randomness), apart.
    pub dealer_bytes: u64,
    /// Wall time spent in this op.
    pub wall_s: f64,
}

impl OpStats {
    pub fn add(&mut self, o: &OpStats) {
        self.rounds += o.rounds;
        self.bytes_sent += o.bytes_sent;
        self.bytes_recv += o.bytes_recv;
        self.dealer_bytes += o.dealer_bytes;
        self.wall_s += o.wall_s;
    }
}

/// Per-op counters, in the order ops were first seen, with a current label that receives the
/// counts and the wall time.
#[derive(Clone, Debug)]
pub struct Stats {
    pub ops: Vec<(String, OpStats)>,
    current: usize,
    since: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            ops: vec![("other".into(), OpStats::default())],
            current: 0,
            since: Instant::now(),
        }
    }
}

impl Stats {
    /// Charges the time since the last switch to the current label, then switches to `label`.
    pub fn begin(&mut self, label: &str) {
        self.flush_time();
        self.current = match self.ops.iter().position(|(l, _)| l == label) {
            Some(i) => i,
            None => {
                self.ops.push((label.to_string(), OpStats::default()));
                self.ops.len() - 1
            }
        };
    }

    fn flush_time(&mut self) {
        let now = Instant::now();
        self.ops[self.current].1.wall_s += (now - self.since).as_secs_f64();
        self.since = now;
    }

    pub fn label(&self) -> &str {
        &self.ops[self.current].0
    }

    pub fn cur(&mut self) -> &mut OpStats {
        &mut self.ops[self.current].1
    }

    /// Per-label counters (time charged up to now), without empty labels.
    pub fn snapshot(&mut self) -> Vec<(String, OpStats)> {
        self.flush_time();
        self.ops
            .iter()
            .filter(|(_, s)| *s != OpStats::default())
            .cloned()
            .collect()
    }

    /// Everything summed.
    pub fn total(&mut self) -> OpStats {
        let mut t = OpStats::default();
        for (_, s) in self.snapshot() {
            t.add(&s);
        }
        t
    }

    /// Adds another run's counters label by label.
    pub fn merge(into: &mut BTreeMap<String, OpStats>, ops: &[(String, OpStats)]) {
        for (l, s) in ops {
            into.entry(l.clone()).or_default().add(s);
        }
    }
}

/// A channel to the other party, with counters.
pub struct Net {
    chan: Box<dyn Channel>,
    pub stats: Stats,
}

impl Net {
    pub fn new(chan: Box<dyn Channel>) -> Self {
        Self {
            chan,
            stats: Stats::default(),
        }
    }

    fn bytes(words: usize) -> u64 {
        FRAME_HEADER_BYTES + 8 * words as u64
    }

    /// One round: send `words`, receive the peer's frame.
    pub fn exchange(&mut self, words: &[u64]) -> Result<Vec<u64>> {
        let op = self.stats.label().to_string();
        let got = self.chan.exchange(&op, words)?;
        let s = self.stats.cur();
        s.rounds += 1;
        s.bytes_sent += Self::bytes(words.len());
        s.bytes_recv += Self::bytes(got.len());
        Ok(got)
    }

    /// One round in one direction: send only.
    pub fn send(&mut self, words: &[u64]) -> Result<()> {
        let op = self.stats.label().to_string();
        self.chan.send(&op, words)?;
        let s = self.stats.cur();
        s.rounds += 1;
        s.bytes_sent += Self::bytes(words.len());
        Ok(())
    }

    /// One round in one direction: receive only.
    pub fn recv(&mut self) -> Result<Vec<u64>> {
        let op = self.stats.label().to_string();
        let got = self.chan.recv(&op)?;
        let s = self.stats.cur();
        s.rounds += 1;
        s.bytes_recv += Self::bytes(got.len());
        Ok(got)
    }

    /// Receives a frame that must hold exactly `n` words (checked from its header).
    pub fn recv_exact(&mut self, n: usize) -> Result<Vec<u64>> {
        let op = self.stats.label().to_string();
        let got = self.chan.recv_exact(&op, n)?;
        let s = self.stats.cur();
        s.rounds += 1;
        s.bytes_recv += Self::bytes(got.len());
        Ok(got)
    }

    /// One round where the peer's frame must hold exactly `n` words (checked from its header).
    pub fn exchange_exact(&mut self, words: &[u64], n: usize) -> Result<Vec<u64>> {
        let op = self.stats.label().to_string();
        let got = self.chan.exchange_exact(&op, words, n)?;
        let s = self.stats.cur();
        s.rounds += 1;
        s.bytes_sent += Self::bytes(words.len());
        s.bytes_recv += Self::bytes(got.len());
        Ok(got)
    }
}

// ---------------------------------------------------------------------------------------------
// Network model.
// ---------------------------------------------------------------------------------------------

/// A named network setting for modelled times.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct NetModel {
    pub name: &'static str,
    /// Round-trip time, seconds.
    pub rtt_s: f64,
    /// Bandwidth, bits per second (each direction).
    pub bits_per_s: f64,
}

/// 1 ms RTT, 10 Gbit/s.
pub const LAN: NetModel = NetModel {
    name: "LAN",
    rtt_s: 1e-3,
    bits_per_s: 10e9,
};
/// 40 ms RTT, 100 Mbit/s.
pub const WAN: NetModel = NetModel {
    name: "WAN",
    rtt_s: 40e-3,
    bits_per_s: 100e6,
};

impl NetModel {
    /// Modelled communication time: every round charged one full RTT (conservative: a
    /// simultaneous exchange needs only a one-way latency), plus the larger direction's bytes at
    /// the bandwidth (full duplex).
    pub fn comm_time(&self, rounds: u64, max_bytes_one_direction: u64) -> f64 {
        rounds as f64 * self.rtt_s + max_bytes_one_direction as f64 * 8.0 / self.bits_per_s
    }

    /// Measured compute time plus modelled communication: `compute_s` is the wall time minus the
    /// time spent waiting on the loopback network (we use the whole wall time: loopback
    /// transfers are part of it, which makes this an upper bound).
    pub fn total_time(&self, wall_s: f64, rounds: u64, max_bytes_one_direction: u64) -> f64 {
        wall_s + self.comm_time(rounds, max_bytes_one_direction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn mem_pair_exchanges_and_times_out() {
        let (mut a, mut b) = mem_pair(Duration::from_millis(100));
        a.send("t", &[1, 2, 3]).unwrap();
        assert_eq!(b.recv("t").unwrap(), vec![1, 2, 3]);
        let h = std::thread::spawn(move || {
            let got = b.exchange("x", &[9]).unwrap();
            (b, got)
        });
        assert_eq!(a.exchange("x", &[7, 8]).unwrap(), vec![9]);
        let (b, got) = h.join().unwrap();
        assert_eq!(got, vec![7, 8]);
        assert!(matches!(a.recv("late"), Err(MpcError::Timeout { .. })));
        drop(b);
        let e = a.recv("gone").unwrap_err();
        assert!(matches!(e, MpcError::PeerClosed { .. }), "{e}");
        assert!(e.to_string().contains("gone"));
    }

    #[test]
    fn tcp_frames_large_exchange_and_errors() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = Duration::from_millis(500);
        let h = std::thread::spawn(move || {
            let mut c = TcpChannel::accept(&l, Duration::from_secs(5)).unwrap();
            // 8 MiB each way at once: larger than socket buffers.
            let big: Vec<u64> = (0..(1u64 << 20)).collect();
            let got = c.exchange("big", &big).unwrap();
            assert_eq!(got.len(), 1 << 20);
            assert_eq!(got[12345], 12345 * 3);
            c.send("s", &[]).unwrap();
            // Then vanish.
        });
        let mut c = TcpChannel::connect(&addr, Duration::from_secs(5)).unwrap();
        let big: Vec<u64> = (0..(1u64 << 20)).map(|x| x * 3).collect();
        let got = c.exchange("big", &big).unwrap();
        assert_eq!(got[777], 777);
        assert!(c.recv("s").unwrap().is_empty());
        h.join().unwrap();
        let e = c.recv("after").unwrap_err();
        assert!(matches!(e, MpcError::PeerClosed { .. }), "{e}");
        // A silent peer: timeout.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let mut c = TcpChannel::connect(&addr, t).unwrap();
        let _keep = TcpChannel::accept(&l, t).unwrap();
        let e = c.recv("quiet").unwrap_err();
        assert!(matches!(e, MpcError::Timeout { .. }), "{e}");
        // A header announcing too much.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let mut c = TcpChannel::connect(&addr, t)
            .unwrap()
            .with_max_frame_words(4);
        let mut s = TcpChannel::accept(&l, t).unwrap();
        s.send("big", &[0; 5]).unwrap();
        assert!(matches!(
            c.recv("big"),
            Err(MpcError::FrameTooLarge { words: 5, .. })
        ));
    }

    #[test]
    fn counting_and_model() {
        let (a, b) = mem_pair(Duration::from_secs(1));
        let mut na = Net::new(Box::new(a));
        let mut nb = Net::new(Box::new(b));
        na.stats.begin("one");
        nb.stats.begin("one");
        na.send(&[1, 2]).unwrap();
        assert_eq!(nb.recv_exact(2).unwrap(), vec![1, 2]);
        na.stats.begin("two");
        na.send(&[1]).unwrap();
        assert!(matches!(
            nb.recv_exact(2),
            Err(MpcError::FrameLength { got: 1, .. })
        ));
        let snap = na.stats.snapshot();
        let one = snap.iter().find(|(l, _)| l == "one").unwrap();
        assert_eq!(one.1.bytes_sent, 8 + 16);
        assert_eq!(na.stats.total().rounds, 2);
        let t = WAN.comm_time(10, 12_500_000);
        assert!((t - (0.4 + 1.0)).abs() < 1e-9);
    }
}
