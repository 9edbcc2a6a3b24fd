//! The MPC links under attack, on loopback: connections without a valid certificate, a P1
//! certificate claiming P0 at the dealer, oversized and wrong-length frames, slow frames, port
//! scans before the real peer, and parties with different settings. Certificates are made by
//! the tests ([`CertSet::generate`]); nothing is committed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpcformer::bench::Shape;
use mpcformer::model::{Act, Approx, Attn};
use mpcformer::mpc::dealer::{Dealer, DealerClient, Req, weight_mask};
use mpcformer::mpc::model::MpcConfig;
use mpcformer::mpc::net::{Channel, TcpChannel, mem_pair};
use mpcformer::mpc::session::{
    PROTOCOL_VERSION, Security, SessionId, Settings, accept_p1, connect, connect_dealer,
    connect_p0, serve_dealer,
};
use mpcformer::mpc::tls::{CertSet, Role, TlsIdentity};
use mpcformer::mpc::{MpcError, Party};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

// ---------------------------------------------------------------------------------------------
// The largest single allocation of the current thread, to show a header alone reserves nothing.
// ---------------------------------------------------------------------------------------------

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

fn largest_allocation_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|m| m.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

const T: Duration = Duration::from_secs(60);

fn tls(set: &CertSet, role: Role) -> Security {
    Security::Tls(Arc::new(set.identity(role).unwrap()))
}

fn settings(tag: &[u8]) -> Settings {
    Settings::new(&[("model", b"tiny"), ("fixed-point fractional bits", tag)])
}

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap().to_string();
    (l, a)
}

type P0Side = JoinHandle<Result<(TcpChannel, SessionId), MpcError>>;

/// P0's side of the P0–P1 link, in a thread.
fn spawn_p0(sec: Security, s: Settings) -> (String, P0Side) {
    let (l, addr) = listener();
    (addr, std::thread::spawn(move || accept_p1(&l, &sec, &s, T)))
}

/// A dealer with known seeds, in a thread.
fn spawn_dealer(sec: Security, seeds: [[u8; 32]; 2]) -> (String, JoinHandle<Result<(), MpcError>>) {
    let (l, addr) = listener();
    let h = std::thread::spawn(move || serve_dealer(&l, &sec, &mut Dealer::from_seeds(seeds), T));
    (addr, h)
}

fn frame(words: &[u64]) -> Vec<u8> {
    let mut b = (words.len() as u64).to_le_bytes().to_vec();
    for w in words {
        b.extend(w.to_le_bytes());
    }
    b
}

/// What the real parties open with: P1's hello to P0 and a party's hello to the dealer, so a
/// server that let the connection through would answer (a hello, a seed or a refusal).
fn p1_hello() -> Vec<u8> {
    frame(&[
        u64::from_le_bytes(*b"mpcf-p2p"),
        PROTOCOL_VERSION,
        1,
        7,
        7,
        0,
    ])
}
fn dealer_hello(party: u64) -> Vec<u8> {
    let mut w = vec![
        u64::from_le_bytes(*b"mpcf-dlr"),
        PROTOCOL_VERSION,
        party,
        1,
        2,
        3,
        4,
    ];
    if party == 0 {
        w.extend([5, 6, 7, 8]);
    }
    frame(&w)
}

/// A party's first draws from its seed: equal draws, equal seeds.
fn draws(d: &mut DealerClient) -> Vec<u64> {
    d.draw(&[Req::Mul { n: 4 }]).remove(0).a
}

fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    })
}

/// Connects with a raw rustls client, sends `first` and reads until the server closes or
/// errors: the application bytes that came back.
fn bytes_back(addr: &str, cfg: Arc<rustls::ClientConfig>, server: Role, first: &[u8]) -> usize {
    let name = ServerName::try_from(server.dns_name()).unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    if s.write_all(first).and_then(|_| s.flush()).is_err() {
        return 0;
    }
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got += n;
    }
    got
}

fn role_pem(set: &CertSet, role: Role) -> (&str, &str) {
    let r = set.roles.iter().find(|r| r.0 == role).unwrap();
    (&r.1, &r.2)
}

fn port_scan(addr: &str) {
    drop(TcpStream::connect(addr).unwrap());
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n garbage \x16\x03\x01\xff\xff");
    drop(s);
}

/// The real P1 and P0 finish the session (hellos, seeds from the dealer); checks both got the
/// same session id and P0 the seed the dealer holds for it.
fn real_session(
    set: &CertSet,
    p0: P0Side,
    p0_addr: &str,
    dealer_addr: &str,
    s: &Settings,
    seed0: [u8; 32],
) {
    let (sec0, sec1) = (tls(set, Role::P0), tls(set, Role::P1));
    let (_c1, sid1) = connect_p0(p0_addr, &sec1, s, T).unwrap();
    let (_c0, sid0) = p0.join().unwrap().unwrap();
    assert_eq!(sid0, sid1);
    let ws = [7u8; 32];
    let mut d0 = connect_dealer(dealer_addr, &sec0, Party::P0, sid0, Some(ws), T).unwrap();
    assert_eq!(d0.weight_mask(3, 5).unwrap(), weight_mask(&ws, 3, 5));
    assert_eq!(
        draws(&mut d0),
        draws(&mut DealerClient::new(Party::P0, seed0, None).unwrap())
    );
    let mut d1 = connect_dealer(dealer_addr, &sec1, Party::P1, sid1, None, T).unwrap();
    d1.finish().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

/// No client certificate, one from another CA, or one of the wrong role: the handshake (or the
/// role check) fails, no application byte comes back from P0's or the dealer's port, and the
/// real parties still get their session afterwards.
#[test]
fn clients_without_a_valid_certificate_get_nothing_from_any_port() {
    let set = CertSet::generate().unwrap();
    let other = CertSet::generate().unwrap();
    let seeds = [[5u8; 32], [6u8; 32]];
    let s = settings(b"16");
    let (p0_addr, p0) = spawn_p0(tls(&set, Role::P0), s.clone());
    let (d_addr, dealer) = spawn_dealer(tls(&set, Role::Dealer), seeds);

    let no_cert = client_config(&set.ca_pem, None);
    let foreign = client_config(&set.ca_pem, Some(role_pem(&other, Role::P1)));
    // A genuine certificate, but the dealer's: P0 accepts only P1 on its port.
    let wrong_role = client_config(&set.ca_pem, Some(role_pem(&set, Role::Dealer)));
    for (what, cfg) in [("no certificate", &no_cert), ("another CA", &foreign)] {
        let got = bytes_back(&p0_addr, cfg.clone(), Role::P0, &p1_hello());
        assert_eq!(got, 0, "P0 answered a client with {what}");
        for party in [0, 1] {
            let got = bytes_back(&d_addr, cfg.clone(), Role::Dealer, &dealer_hello(party));
            assert_eq!(got, 0, "the dealer answered a client with {what}");
        }
    }
    assert_eq!(bytes_back(&p0_addr, wrong_role, Role::P0, &p1_hello()), 0);

    real_session(&set, p0, &p0_addr, &d_addr, &s, seeds[0]);
    dealer.join().unwrap().unwrap();
}

/// A valid P1 certificate sending P0's hello gets a refusal, not P0's seed; a second P0, or a
/// P1 of another session, is refused too; the real parties are served.
#[test]
fn a_p1_certificate_claiming_p0_gets_no_seed() {
    let set = CertSet::generate().unwrap();
    let seeds = [[11u8; 32], [12u8; 32]];
    let (d_addr, dealer) = spawn_dealer(tls(&set, Role::Dealer), seeds);
    let (sec0, sec1) = (tls(&set, Role::P0), tls(&set, Role::P1));
    let sid = SessionId([9; 32]);

    let chan = connect(&d_addr, &sec1, Role::P1, Role::Dealer, T).unwrap();
    let e = DealerClient::connect(Party::P0, Box::new(chan), sid, None)
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("claims a role other than"), "{e}");

    let mut d0 = connect_dealer(&d_addr, &sec0, Party::P0, sid, None, T).unwrap();
    let p0_seed = DealerClient::new(Party::P0, seeds[0], None).unwrap();
    assert_eq!(draws(&mut d0), draws(&mut { p0_seed }));
    let e = connect_dealer(&d_addr, &sec0, Party::P0, sid, None, T)
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("already handed out"), "{e}");
    let e = connect_dealer(&d_addr, &sec1, Party::P1, SessionId([8; 32]), None, T)
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("another session"), "{e}");
    // No error or Debug output carries a seed byte pattern.
    assert!(!format!("{e:?}").contains("11, 11"));

    let mut d1 = connect_dealer(&d_addr, &sec1, Party::P1, sid, None, T).unwrap();
    d1.finish().unwrap();
    dealer.join().unwrap().unwrap();
}

/// A frame header announcing 2^31 words reserves nothing (the receiver waits for bytes that
/// never come and times out); a header other than the expected length or above the cap is
/// refused at once; over TLS too.
#[test]
fn oversized_or_wrong_length_frames_are_refused_without_allocating() {
    let short = Duration::from_millis(800);
    // Plaintext: raw bytes from the "peer".
    let (l, addr) = listener();
    let mut raw = TcpStream::connect(&addr).unwrap();
    let mut c = TcpChannel::accept(&l, short).unwrap();
    raw.write_all(&(1u64 << 31).to_le_bytes()).unwrap();
    let (r, largest) = largest_allocation_during(|| c.recv("huge"));
    assert!(matches!(r, Err(MpcError::Timeout { .. })), "{r:?}");
    assert!(
        largest < 8 << 20,
        "a header alone made the receiver allocate {largest} bytes"
    );

    let (l, addr) = listener();
    let mut raw = TcpStream::connect(&addr).unwrap();
    let mut c = TcpChannel::accept(&l, short).unwrap();
    raw.write_all(&(1u64 << 31).to_le_bytes()).unwrap();
    let (r, largest) = largest_allocation_during(|| c.recv_exact("shape", 2));
    assert!(
        matches!(r, Err(MpcError::FrameLength { expected: 2, got, .. }) if got == 1 << 31),
        "{r:?}"
    );
    assert!(largest < 8 << 20, "{largest}");
    raw.write_all(&frame(&[1, 2, 3])).unwrap();
    let r = c.recv_max("control", 2);
    assert!(
        matches!(
            r,
            Err(MpcError::FrameTooLarge {
                words: 3,
                limit: 2,
                ..
            })
        ),
        "{r:?}"
    );

    // TLS: a genuine peer announcing too much.
    let set = CertSet::generate().unwrap();
    let (p0, p1) = (
        set.identity(Role::P0).unwrap(),
        set.identity(Role::P1).unwrap(),
    );
    let (l, addr) = listener();
    let client = std::thread::spawn(move || {
        let s = TcpStream::connect(&addr).unwrap();
        let by = Instant::now() + T;
        let mut c = TcpChannel::tls(s, p1.client_conn(Role::P0).unwrap(), short, by).unwrap();
        c.send("ok", &[1, 2]).unwrap();
        c.send("big", &[0; 5]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let (s, _) = l.accept().unwrap();
    let mut c = TcpChannel::tls(s, tls_server(&p0), short, Instant::now() + T).unwrap();
    assert_eq!(c.recv_exact("ok", 2).unwrap(), vec![1, 2]);
    let r = c.recv_exact("big", 4);
    assert!(
        matches!(
            r,
            Err(MpcError::FrameLength {
                expected: 4,
                got: 5,
                ..
            })
        ),
        "{r:?}"
    );
    client.join().unwrap();
}

fn tls_server(id: &TlsIdentity) -> rustls::Connection {
    id.server_conn().unwrap()
}

/// A frame's deadline covers the whole frame: a peer trickling one byte every 150 ms (each read
/// well within the timeout) is cut off after the timeout, not after the 10 s the frame takes.
#[test]
fn a_frame_has_one_deadline_not_one_per_read() {
    let (l, addr) = listener();
    let trickle = std::thread::spawn(move || {
        let mut raw = TcpStream::connect(&addr).unwrap();
        for b in frame(&[7; 8]) {
            if raw.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    });
    let mut c = TcpChannel::accept(&l, Duration::from_secs(5)).unwrap();
    c.set_timeout(Duration::from_secs(1));
    let t = Instant::now();
    let r = c.recv("slow");
    assert!(matches!(r, Err(MpcError::Timeout { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    drop(c);
    trickle.join().unwrap();
}

/// The dealer refuses requests whose sizes overflow or exceed its cap, and a count of items
/// the frame cannot hold, before drawing anything.
#[test]
fn the_dealer_caps_request_sizes() {
    let cases: [(&[u64], &str); 3] = [
        (
            &[1, 4, 1 << 20, 1 << 20, 1 << 20, 1 << 20],
            "exceed the cap",
        ),
        (&[1, 4, u64::MAX / 2, 3, 3, 3], "exceed the cap"),
        (&[1 << 40, 1, 5], "malformed"),
    ];
    for (req, want) in cases {
        let (mut p1, mut d) = mem_pair(Duration::from_secs(5));
        p1.send("req", req).unwrap();
        let mut dealer = Dealer::new().with_max_round_words(1 << 24);
        let (r, largest) = largest_allocation_during(|| dealer.serve(&mut d));
        let e = r.unwrap_err().to_string();
        assert!(e.contains(want), "{req:?}: {e}");
        assert!(largest < 8 << 20, "{req:?}: {largest}");
    }
}

/// P0 checks P1's announced input shape before allocating for it.
#[test]
fn p0_refuses_an_absurd_input_shape() {
    let cfg = MpcConfig::new(
        Shape::Minilm.config(Approx::new(Act::Quad, Attn::TwoQuad)),
        16,
        None,
    )
    .unwrap();
    assert_eq!(cfg.check_input_shape(&[2, 16]).unwrap(), Some((2, 16)));
    assert_eq!(cfg.check_input_shape(&[0, 0]).unwrap(), None);
    for bad in [[1u64 << 40, 1 << 40], [1, 513], [1, 0], [u64::MAX, 2]] {
        let e = cfg.check_input_shape(&bad).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
    }
}

/// Connect-and-close, garbage bytes, a non-mpcformer frame and a silent connection before the
/// real peer: P0's and the dealer's listeners drop them and serve the real parties (plaintext
/// and TLS).
#[test]
fn a_port_scan_before_the_peer_does_not_end_the_session() {
    // Plaintext.
    let s = settings(b"16");
    let (p0_addr, p0) = spawn_p0(Security::Plaintext, s.clone());
    let (d_addr, dealer) = spawn_dealer(Security::Plaintext, [[1; 32], [2; 32]]);
    for a in [&p0_addr, &d_addr] {
        port_scan(a);
        let mut junk = TcpStream::connect(a).unwrap();
        junk.write_all(&frame(&[42, 42, 42])).unwrap();
        drop(junk);
    }
    let (_c1, sid1) = connect_p0(&p0_addr, &Security::Plaintext, &s, T).unwrap();
    let (_c0, sid0) = p0.join().unwrap().unwrap();
    assert_eq!(sid0, sid1);
    connect_dealer(&d_addr, &Security::Plaintext, Party::P0, sid0, None, T).unwrap();
    let mut d1 = connect_dealer(&d_addr, &Security::Plaintext, Party::P1, sid1, None, T).unwrap();
    d1.finish().unwrap();
    dealer.join().unwrap().unwrap();

    // TLS.
    let set = CertSet::generate().unwrap();
    let (p0_addr, p0) = spawn_p0(tls(&set, Role::P0), s.clone());
    let (d_addr, dealer) = spawn_dealer(tls(&set, Role::Dealer), [[3; 32], [4; 32]]);
    port_scan(&p0_addr);
    port_scan(&d_addr);
    // A connection that says nothing holds P0's listener for HANDSHAKE_TIMEOUT at most; the real
    // P1, right behind it, waits out that time in its own handshake.
    let silent = TcpStream::connect(&p0_addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    real_session(&set, p0, &p0_addr, &d_addr, &s, [3; 32]);
    drop(silent);
    dealer.join().unwrap().unwrap();
}

/// Parties whose fixed-point fractional bits differ both stop at the hello, each with an error
/// naming the setting, before any share is sent.
#[test]
fn mismatched_fractional_bits_are_refused_at_start_up() {
    let mc = Shape::Minilm.config(Approx::new(Act::Quad, Attn::TwoQuad));
    let c16 = MpcConfig::new(mc.clone(), 16, None).unwrap();
    let c20 = MpcConfig::new(mc.clone(), 20, None).unwrap();
    assert_eq!(
        c16.settings(),
        MpcConfig::new(mc, 16, None).unwrap().settings()
    );
    let set = CertSet::generate().unwrap();
    let (p0_addr, p0) = spawn_p0(tls(&set, Role::P0), c16.settings());
    let e1 = connect_p0(&p0_addr, &tls(&set, Role::P1), &c20.settings(), T)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let e0 = p0.join().unwrap().map(|_| ()).unwrap_err().to_string();
    for (who, e) in [("P0", &e0), ("P1", &e1)] {
        assert!(e.contains("fixed-point fractional bits"), "{who}: {e}");
        assert!(
            e.starts_with(who) && e.contains("settings check"),
            "{who}: {e}"
        );
        assert!(!e.contains("architecture"), "{who}: {e}");
    }
}

/// A model whose 2Quad row sums span too wide a range for one fixed-point plan is refused
/// before any party runs, naming the op — not run into garbage (a fitted STS-B student's
/// layer 5, calibrated on dev: sums from 84 to 1.85e7). A fitted CoLA student's range plans.
#[test]
fn a_range_too_wide_for_fixed_point_is_refused() {
    use mpcformer::export::format::{OpKind, OpRange};
    let model = Shape::Minilm.config(Approx::new(Act::Quad, Attn::TwoQuad));
    let row_sum = |min: f64, max: f64| OpRange {
        op: "layer.5.2quad.row_sum".into(),
        kind: OpKind::Reciprocal,
        max_abs: max,
        min: Some(min),
        headroom_bits: 0.0,
        min_bits: None,
    };
    let e = MpcConfig::new(model.clone(), 16, Some(&[row_sum(84.45, 1.854e7)]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer.5.2quad.row_sum") && e.contains("0.4 bits"),
        "{e}"
    );
    // Four more fractional bits keep 4.4.
    MpcConfig::new(model.clone(), 20, Some(&[row_sum(84.45, 1.854e7)])).unwrap();
    MpcConfig::new(model, 16, Some(&[row_sum(15.0, 2.8e4)])).unwrap();
}
