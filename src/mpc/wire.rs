//! Frames over TCP, in plaintext or inside TLS 1.3: [`TcpChannel`].
//!
//! A frame is an 8-byte little-endian word count, then the words, little-endian. Both
//! transports run the same single-threaded loop over a non-blocking socket: hand plaintext to
//! the link while it has room, write what the link has ready, read while the frame is
//! incomplete, and `poll` when neither moves. Reading and writing in one loop is what keeps
//! [`Channel::exchange`] deadlock-free (two parties each sending a frame larger than the socket
//! buffers both keep reading); a TLS connection's state cannot be split between a reader and a
//! writer thread the way a plain socket can.
//!
//! **Bounds.** A frame's header is checked before anything is allocated: against the length the
//! caller expects ([`Channel::recv_exact`], [`Channel::exchange_exact`]) or a cap
//! ([`Channel::recv_max`], the channel's `max_words`). Where only the cap is known the buffer
//! grows with the bytes that actually arrive, so a header announcing 2^31 words reserves nothing.
//! Every call (`send`, `recv`, `exchange`) has one deadline for the whole frame, not per read.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::net::{Channel, DEFAULT_MAX_FRAME_WORDS};
use super::{MpcError, Result};

/// What protects a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// No encryption, no authentication (`--insecure-plaintext`).
    Plaintext,
    /// Mutual TLS 1.3.
    Tls13,
}

impl Transport {
    /// The name in reports (`"transport"` of `mpc run` / `mpc bench`).
    pub fn name(self) -> &'static str {
        match self {
            Transport::Plaintext => "plaintext",
            Transport::Tls13 => "tls13",
        }
    }
}

/// Bytes read from the socket at once (and the scratch size of frame parsing).
const IO_CHUNK: usize = 256 << 10;
/// Words serialised per step of a send.
const OUT_WORDS: usize = 8 << 10;
/// Plaintext bytes a plain link buffers before writing them out.
const PLAIN_OUT_LIMIT: usize = 256 << 10;

/// Socket reads, buffered: TLS asks for 4 KiB at a time, one syscall each without this.
struct SockIn {
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
}

impl SockIn {
    fn new() -> Self {
        Self {
            buf: vec![0; IO_CHUNK].into_boxed_slice(),
            pos: 0,
            len: 0,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..self.len]
    }

    /// Copies buffered bytes out, reading the socket once when none are buffered (`WouldBlock`
    /// when it has none either, `Ok(0)` at end of stream).
    fn read_from(&mut self, sock: &mut TcpStream, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.len {
            let n = loop {
                match sock.read(&mut self.buf) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            self.pos = 0;
            self.len = n;
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// [`SockIn`] and its socket as one `Read` (what `read_tls` takes).
struct SockReader<'a> {
    sock: &'a mut TcpStream,
    sin: &'a mut SockIn,
}

impl Read for SockReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.sin.read_from(self.sock, out)
    }
}

enum Link {
    Plain { out: Vec<u8>, sent: usize },
    Tls(Box<rustls::Connection>),
}

fn tls_io(e: rustls::Error) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e)
}

impl Link {
    /// Accepts plaintext to send, as much as fits now.
    fn queue(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain { out, sent } => {
                if *sent == out.len() {
                    out.clear();
                    *sent = 0;
                }
                let n = bytes.len().min(PLAIN_OUT_LIMIT.saturating_sub(out.len()));
                out.extend_from_slice(&bytes[..n]);
                Ok(n)
            }
            Link::Tls(c) => c.writer().write(bytes),
        }
    }

    fn wants_write(&self) -> bool {
        match self {
            Link::Plain { out, sent } => *sent < out.len(),
            Link::Tls(c) => c.wants_write(),
        }
    }

    fn write_some(&mut self, sock: &mut TcpStream) -> io::Result<usize> {
        match self {
            Link::Plain { out, sent } => {
                let n = sock.write(&out[*sent..])?;
                *sent += n;
                Ok(n)
            }
            Link::Tls(c) => c.write_tls(sock),
        }
    }

    /// Plaintext received: `Ok(0)` at the end of the stream, `WouldBlock` when the socket has
    /// nothing now.
    fn read_plain(
        &mut self,
        sock: &mut TcpStream,
        sin: &mut SockIn,
        out: &mut [u8],
    ) -> io::Result<usize> {
        match self {
            Link::Plain { .. } => sin.read_from(sock, out),
            Link::Tls(c) => loop {
                match c.reader().read(out) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    r => return r,
                }
                c.read_tls(&mut SockReader { sock, sin })?;
                c.process_new_packets().map_err(tls_io)?;
            },
        }
    }
}

/// A frame being received.
struct FrameIn {
    limit: u64,
    expect: Option<usize>,
    head: [u8; 8],
    head_len: usize,
    words: Vec<u64>,
    total: usize,
    part: [u8; 8],
    part_len: usize,
}

impl FrameIn {
    fn new(limit: u64, expect: Option<usize>) -> Self {
        Self {
            limit,
            expect,
            head: [0; 8],
            head_len: 0,
            words: Vec::new(),
            total: 0,
            part: [0; 8],
            part_len: 0,
        }
    }

    fn done(&self) -> bool {
        self.head_len == 8 && self.words.len() == self.total
    }

    /// Bytes still missing.
    fn want(&self) -> usize {
        if self.head_len < 8 {
            8 - self.head_len
        } else {
            8 * (self.total - self.words.len()) - self.part_len
        }
    }

    /// Takes the header; checks it before any allocation.
    fn header(&mut self, op: &str) -> Result<()> {
        let n = u64::from_le_bytes(self.head);
        if n > self.limit {
            return Err(MpcError::FrameTooLarge {
                op: op.into(),
                words: n,
                limit: self.limit,
            });
        }
        let n = usize::try_from(n).map_err(|_| MpcError::FrameTooLarge {
            op: op.into(),
            words: n,
            limit: self.limit,
        })?;
        match self.expect {
            Some(e) if e != n => {
                return Err(MpcError::FrameLength {
                    op: op.into(),
                    expected: e,
                    got: n,
                });
            }
            // The caller's own expectation: safe to reserve at once.
            Some(_) => self.words.reserve_exact(n),
            // Only the cap: grow with what arrives.
            None => self.words.reserve(n.min(OUT_WORDS)),
        }
        self.total = n;
        Ok(())
    }

    fn take(&mut self, op: &str, mut bytes: &[u8]) -> Result<()> {
        if self.head_len < 8 {
            let n = bytes.len().min(8 - self.head_len);
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len < 8 {
                return Ok(());
            }
            self.header(op)?;
        }
        if self.part_len > 0 {
            let n = bytes.len().min(8 - self.part_len);
            self.part[self.part_len..self.part_len + n].copy_from_slice(&bytes[..n]);
            self.part_len += n;
            bytes = &bytes[n..];
            if self.part_len < 8 {
                return Ok(());
            }
            self.words.push(u64::from_le_bytes(self.part));
            self.part_len = 0;
        }
        let whole = bytes.chunks_exact(8);
        let rest = whole.remainder();
        self.words
            .extend(whole.map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))));
        self.part[..rest.len()].copy_from_slice(rest);
        self.part_len = rest.len();
        Ok(())
    }
}

/// A frame being sent: the header and words, serialised a slice at a time.
struct FrameOut<'a> {
    words: &'a [u64],
    next: usize,
    staged: Vec<u8>,
    pos: usize,
}

impl<'a> FrameOut<'a> {
    fn new(words: &'a [u64]) -> Self {
        let mut staged = Vec::with_capacity(8 * (1 + words.len().min(OUT_WORDS)));
        staged.extend_from_slice(&(words.len() as u64).to_le_bytes());
        Self {
            words,
            next: 0,
            staged,
            pos: 0,
        }
    }

    fn done(&self) -> bool {
        self.pos == self.staged.len() && self.next == self.words.len()
    }

    /// Hands the link what it takes; whether anything moved.
    fn feed(&mut self, link: &mut Link) -> io::Result<bool> {
        let mut moved = false;
        loop {
            if self.pos == self.staged.len() {
                if self.next == self.words.len() {
                    return Ok(moved);
                }
                let end = (self.next + OUT_WORDS).min(self.words.len());
                self.staged.clear();
                for w in &self.words[self.next..end] {
                    self.staged.extend_from_slice(&w.to_le_bytes());
                }
                self.next = end;
                self.pos = 0;
            }
            let n = link.queue(&self.staged[self.pos..])?;
            if n == 0 {
                return Ok(moved);
            }
            self.pos += n;
            moved = true;
        }
    }
}

fn io_err(op: &str, e: io::Error, timeout: Duration) -> MpcError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => MpcError::Timeout {
            op: op.into(),
            timeout,
        },
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::NotConnected => MpcError::PeerClosed { op: op.into() },
        _ => MpcError::Io {
            op: op.into(),
            source: e,
        },
    }
}

/// Waits until the socket is readable (`read`) or writable (`write`), or the deadline passes.
fn wait(sock: &TcpStream, read: bool, write: bool, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ErrorKind::TimedOut.into());
    }
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    let mut fd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd, for the duration of the call.
    let r = unsafe { libc::poll(&mut fd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Length-prefixed frames over TCP, plaintext or TLS 1.3 (see the module docs).
pub struct TcpChannel {
    sock: TcpStream,
    sin: SockIn,
    link: Link,
    timeout: Duration,
    max_words: u64,
    scratch: Vec<u8>,
    peer: String,
}

impl TcpChannel {
    fn new(sock: TcpStream, link: Link, timeout: Duration) -> Result<Self> {
        let map = |e| io_err("connect", e, timeout);
        sock.set_nodelay(true).map_err(map)?;
        sock.set_nonblocking(true).map_err(map)?;
        let peer = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        Ok(Self {
            sock,
            sin: SockIn::new(),
            link,
            timeout,
            max_words: DEFAULT_MAX_FRAME_WORDS,
            scratch: vec![0; IO_CHUNK],
            peer,
        })
    }

    /// Plaintext frames over a connected stream: `timeout` bounds every frame.
    pub fn from_stream(stream: TcpStream, timeout: Duration) -> Result<Self> {
        Self::new(
            stream,
            Link::Plain {
                out: Vec::new(),
                sent: 0,
            },
            timeout,
        )
    }

    /// TLS over a connected stream: runs the handshake (which must finish by `handshake_by`);
    /// `timeout` then bounds every frame. The caller checks the peer's identity
    /// ([`TcpChannel::tls_connection`]).
    pub fn tls(
        stream: TcpStream,
        conn: rustls::Connection,
        timeout: Duration,
        handshake_by: Instant,
    ) -> Result<Self> {
        let mut c = Self::new(stream, Link::Tls(Box::new(conn)), timeout)?;
        c.handshake(handshake_by)?;
        Ok(c)
    }

    /// Plaintext: connects to `addr`, retrying until `timeout` (the peer may not listen yet).
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self> {
        Self::from_stream(connect_stream(addr, timeout)?, timeout)
    }

    /// Plaintext: accepts one connection on `listener`, waiting at most `timeout`.
    pub fn accept(listener: &TcpListener, timeout: Duration) -> Result<Self> {
        let (s, _) = accept_stream(listener, Instant::now() + timeout)?;
        Self::from_stream(s, timeout)
    }

    /// Frames above `words` words are refused on receipt.
    pub fn with_max_frame_words(mut self, words: u64) -> Self {
        self.max_words = words;
        self
    }

    /// Changes the per-frame deadline.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn transport(&self) -> Transport {
        match self.link {
            Link::Plain { .. } => Transport::Plaintext,
            Link::Tls(_) => Transport::Tls13,
        }
    }

    /// The peer's address (for errors and logs).
    pub fn peer_addr(&self) -> &str {
        &self.peer
    }

    /// The TLS connection (peer certificates), `None` for plaintext.
    pub fn tls_connection(&self) -> Option<&rustls::Connection> {
        match &self.link {
            Link::Tls(c) => Some(c),
            Link::Plain { .. } => None,
        }
    }

    fn flush(&mut self, op: &str) -> Result<bool> {
        let mut moved = false;
        while self.link.wants_write() {
            match self.link.write_some(&mut self.sock) {
                Ok(0) => return Err(MpcError::PeerClosed { op: op.into() }),
                Ok(_) => moved = true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(op, e, self.timeout)),
            }
        }
        Ok(moved)
    }

    fn handshake(&mut self, deadline: Instant) -> Result<()> {
        let op = "TLS handshake";
        loop {
            let mut moved = self.flush(op)?;
            let Link::Tls(c) = &self.link else {
                return Ok(());
            };
            if !c.is_handshaking() && !c.wants_write() {
                return Ok(());
            }
            let reading = c.is_handshaking() && c.wants_read();
            if reading {
                moved |= self.handshake_read(op)?;
            }
            if !moved {
                let write = self.link.wants_write();
                wait(&self.sock, reading, write, deadline)
                    .map_err(|e| io_err(op, e, self.timeout))?;
            }
        }
    }

    /// Reads and processes what the socket has of the peer's handshake; whether anything came.
    fn handshake_read(&mut self, op: &str) -> Result<bool> {
        let Link::Tls(c) = &mut self.link else {
            return Ok(false);
        };
        let mut r = SockReader {
            sock: &mut self.sock,
            sin: &mut self.sin,
        };
        match c.read_tls(&mut r) {
            Ok(0) => Err(MpcError::PeerClosed { op: op.into() }),
            Ok(_) => match c.process_new_packets() {
                Ok(_) => Ok(true),
                Err(e) => {
                    // Best effort: the alert rustls queued tells the peer why.
                    let _ = self.flush(op);
                    Err(io_err(op, tls_io(e), self.timeout))
                }
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(io_err(op, e, self.timeout)),
        }
    }

    /// Sends `out` and/or receives into `inp`, until both are done or the deadline passes.
    fn pump(&mut self, op: &str, out: Option<&[u64]>, mut inp: Option<&mut FrameIn>) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        let mut out = out.map(FrameOut::new);
        loop {
            let mut moved = false;
            if let Some(o) = out.as_mut() {
                moved |= o.feed(&mut self.link).map_err(|e| io_err(op, e, timeout))?;
            }
            moved |= self.flush(op)?;
            if let Some(r) = inp.as_deref_mut() {
                while !r.done() {
                    let n = r.want().min(self.scratch.len());
                    match self.link.read_plain(
                        &mut self.sock,
                        &mut self.sin,
                        &mut self.scratch[..n],
                    ) {
                        Ok(0) => return Err(MpcError::PeerClosed { op: op.into() }),
                        Ok(k) => {
                            r.take(op, &self.scratch[..k])?;
                            moved = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_err(op, e, timeout)),
                    }
                }
                // A TLS read may have queued a reply (an alert, a key update).
                moved |= self.flush(op)?;
            }
            let out_done = out.as_ref().is_none_or(FrameOut::done) && !self.link.wants_write();
            let in_done = inp.as_deref().is_none_or(FrameIn::done);
            if out_done && in_done {
                return Ok(());
            }
            if !moved {
                let read = !in_done && self.sin.buffered().is_empty();
                let write = self.link.wants_write();
                wait(&self.sock, read, write, deadline).map_err(|e| io_err(op, e, timeout))?;
            }
        }
    }

    fn receive(
        &mut self,
        op: &str,
        out: Option<&[u64]>,
        limit: u64,
        expect: Option<usize>,
    ) -> Result<Vec<u64>> {
        let mut f = FrameIn::new(limit.min(self.max_words), expect);
        self.pump(op, out, Some(&mut f))?;
        Ok(f.words)
    }
}

impl Channel for TcpChannel {
    fn send(&mut self, op: &str, words: &[u64]) -> Result<()> {
        self.pump(op, Some(words), None)
    }
    fn recv(&mut self, op: &str) -> Result<Vec<u64>> {
        self.receive(op, None, u64::MAX, None)
    }
    fn recv_exact(&mut self, op: &str, n: usize) -> Result<Vec<u64>> {
        self.receive(op, None, u64::MAX, Some(n))
    }
    fn recv_max(&mut self, op: &str, max_words: u64) -> Result<Vec<u64>> {
        self.receive(op, None, max_words, None)
    }
    fn exchange(&mut self, op: &str, words: &[u64]) -> Result<Vec<u64>> {
        self.receive(op, Some(words), u64::MAX, None)
    }
    fn exchange_exact(&mut self, op: &str, words: &[u64], n: usize) -> Result<Vec<u64>> {
        self.receive(op, Some(words), u64::MAX, Some(n))
    }
}

impl Drop for TcpChannel {
    /// Tells a TLS peer the stream ends here (its next read sees a clean close, not a
    /// truncation), if the socket takes the alert at once.
    fn drop(&mut self) {
        if let Link::Tls(c) = &mut self.link {
            c.send_close_notify();
            let _ = self.flush("close");
        }
    }
}

/// Connects to `addr`, retrying until `timeout` (the peer may not be listening yet).
pub fn connect_stream(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    let conn_err = |source| MpcError::Connect {
        addr: addr.into(),
        timeout,
        source,
    };
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(conn_err)?.collect();
    loop {
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(2).min(timeout)) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        if Instant::now() >= deadline {
            return Err(conn_err(
                last.unwrap_or_else(|| io::Error::other("no address")),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Accepts one TCP connection on `listener` by `deadline` (blocking mode on return).
pub fn accept_stream(listener: &TcpListener, deadline: Instant) -> Result<(TcpStream, SocketAddr)> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let timeout = deadline.saturating_duration_since(Instant::now());
    match poll_accept(listener, deadline) {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(MpcError::Connect {
            addr,
            timeout,
            source: io::Error::new(ErrorKind::TimedOut, "no peer connected"),
        }),
        Err(source) => Err(MpcError::Connect {
            addr,
            timeout,
            source,
        }),
    }
}

/// One TCP connection on `listener` by `deadline`, or `None` if none came (blocking mode on
/// return). Polls, so a service loop can look at its shutdown flag between calls.
pub fn poll_accept(
    listener: &TcpListener,
    deadline: Instant,
) -> io::Result<Option<(TcpStream, SocketAddr)>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok(Some((s, a)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // A peer that reset before we took it is its own problem, not the listener's.
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        }
    }
}
