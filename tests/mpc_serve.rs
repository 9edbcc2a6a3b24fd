//! `mpc serve` / `mpc dealer` / `mpc client` on loopback, with the quickstart student
//! (`tests/fixtures/quickstart-student`: `recipes/quickstart.toml`'s student, exported with f16
//! weights and no pytorch_model.bin). Sessions one after another and at once agree with the
//! plaintext model on the same batches; a killed client, a restarted dealer, a client sending
//! garbage and SIGTERM each end no more than they should.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::prelude::Device;
use mpcformer::io::HostTensor;
use mpcformer::model::{Overrides, load_pretrained};
use mpcformer::mpc::client::{self, Query, public_dir, run_session};
use mpcformer::mpc::model::MpcConfig;
use mpcformer::mpc::net::Channel;
use mpcformer::mpc::session::{Security, connect_p0};
use mpcformer::mpc::tls::{CertPaths, CertSet, Role, TlsIdentity};
use mpcformer::tokenize::{HostBatch, TextTokenizer};

/// Largest |MPC − plaintext| logit allowed (the tiny models' bound in tests/mpc.rs).
const LOGIT_TOL: f64 = 2e-2;
const T: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn export() -> PathBuf {
    repo().join("tests/fixtures/quickstart-student")
}

/// SST-2 dev sentences of the quickstart data, in file order.
fn sentences(n: usize) -> Vec<Query> {
    let text = std::fs::read_to_string(repo().join("data/quickstart/SST-2/dev.tsv")).unwrap();
    text.lines()
        .skip(1)
        .take(n)
        .map(|l| Query {
            text: l.split('\t').next().unwrap().to_string(),
            text_pair: None,
        })
        .collect()
}

fn certs(dir: &Path) -> PathBuf {
    let d = dir.join("certs");
    CertSet::generate().unwrap().write_dir(&d, false).unwrap();
    d
}

fn p1_security(certs: &Path) -> Security {
    Security::Tls(Arc::new(
        TlsIdentity::load(Role::P1, &CertPaths::in_dir(certs, Role::P1)).unwrap(),
    ))
}

/// A service process, its address and its stdout lines as they come.
struct Service {
    child: Child,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Service {
    fn start(args: &[String]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mpcformer"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let addr = first
            .trim()
            .strip_prefix("MPC_LISTENING ")
            .unwrap_or_else(|| panic!("{args:?} did not start: {first:?}"))
            .to_string();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Self { child, addr, lines }
    }

    fn dealer(certs: &Path, listen: &str) -> Self {
        Self::start(&[
            "mpc".into(),
            "dealer".into(),
            "--listen".into(),
            listen.into(),
            "--certs".into(),
            certs.display().to_string(),
            "--timeout-s".into(),
            "20".into(),
        ])
    }

    fn serve(certs: &Path, dealer: &str, max_sessions: usize) -> Self {
        Self::start(&[
            "mpc".into(),
            "serve".into(),
            "--model".into(),
            export().display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--dealer".into(),
            dealer.into(),
            "--certs".into(),
            certs.display().to_string(),
            "--max-sessions".into(),
            max_sessions.to_string(),
            "--timeout-s".into(),
            "10".into(),
        ])
    }

    /// Session lines logged so far, and how many say FAILED.
    fn sessions(&self) -> (usize, usize) {
        let l = self.lines.lock().unwrap();
        let s: Vec<&String> = l.iter().filter(|x| x.starts_with("session ")).collect();
        (s.len(), s.iter().filter(|x| x.contains("FAILED")).count())
    }

    /// Waits until `n` session lines are logged.
    fn wait_sessions(&self, n: usize, within: Duration) -> (usize, usize) {
        let by = Instant::now() + within;
        while self.sessions().0 < n && Instant::now() < by {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.sessions()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we started.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client's side of the export: config, tokenizer and the plaintext model for reference.
struct Reference {
    cfg: MpcConfig,
    tok: TextTokenizer,
}

impl Reference {
    fn new() -> Self {
        let dir = public_dir(&export());
        assert!(dir.ends_with("p1"), "the fixture has a public part");
        Self {
            cfg: MpcConfig::from_export(&dir).unwrap(),
            tok: TextTokenizer::from_dir(&dir, client::max_length(&dir).unwrap()).unwrap(),
        }
    }

    fn plan(&self, q: &[Query], batch: usize) -> client::Plan {
        client::plan(&self.tok, q, batch, &client::DEFAULT_BUCKETS).unwrap()
    }
}

/// Logits of the plaintext export on `batches`, in batch order.
fn plaintext_logits(batches: &[HostBatch]) -> Vec<f64> {
    let device = Device::flex();
    let pre = load_pretrained(
        &export().to_string_lossy(),
        &Overrides {
            no_dropout: true,
            ..Overrides::default()
        },
        &device,
    )
    .unwrap();
    batches
        .iter()
        .flat_map(|b| HostTensor::from_float(pre.model.logits(&b.to_inputs(&device))).to_f64())
        .collect()
}

/// Same argmax everywhere and every logit within LOGIT_TOL.
fn assert_agrees(mpc: &[f64], plain: &[f64], what: &str) {
    assert_eq!(mpc.len(), plain.len(), "{what}");
    for (i, (m, p)) in mpc.chunks(2).zip(plain.chunks(2)).enumerate() {
        assert_eq!(
            m[0] > m[1],
            p[0] > p[1],
            "{what}: example {i}: {m:?} vs {p:?}"
        );
        for (a, b) in m.iter().zip(p) {
            assert!(
                (a - b).abs() <= LOGIT_TOL,
                "{what}: example {i}: {m:?} vs {p:?}"
            );
        }
    }
}

fn session(r: &Reference, sec: &Security, p0: &str, dealer: &str, plan: &client::Plan) -> Vec<f64> {
    run_session(r.cfg.clone(), sec, p0, dealer, &plan.batches, T, |_| {})
        .unwrap()
        .logits
}

/// A free port on loopback (bound and released), for a dealer that restarts on it.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `mpc client` as a process classifying `n` dev sentences one per batch (a long session);
/// returns it once its session has begun, with its stderr lines.
fn long_client(certs: &Path, p0: &str, dealer: &str, n: usize) -> (Child, Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mpcformer"))
        .args(["mpc", "client", "--model"])
        .arg(export())
        .args(["--peer", p0, "--dealer", dealer, "--certs"])
        .arg(certs)
        .args(["--task", "sst2", "--data"])
        .arg(repo().join("data/quickstart"))
        .args(["--limit", &n.to_string(), "--batch-size", "1"])
        .args(["--timeout-s", "10"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = channel();
    let err = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let begun = loop {
        match rx.recv_timeout(T) {
            Ok(line) if line.starts_with("session ") => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    if !begun {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the client's session did not begin within {T:?}");
    }
    (child, rx)
}

#[test]
fn fifty_sequential_and_eight_concurrent_sessions_agree_with_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path());
    let dealer = Service::dealer(&certs, "127.0.0.1:0");
    let p0 = Service::serve(&certs, &dealer.addr, 4);
    let r = Reference::new();
    let sec = p1_security(&certs);
    let qs = sentences(58);

    let plans: Vec<client::Plan> = qs
        .iter()
        .map(|q| r.plan(std::slice::from_ref(q), 1))
        .collect();
    for (i, plan) in plans[..50].iter().enumerate() {
        let mpc = session(&r, &sec, &p0.addr, &dealer.addr, plan);
        assert_agrees(
            &mpc,
            &plaintext_logits(&plan.batches),
            &format!("session {i}"),
        );
    }
    let logits: Vec<Vec<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = plans[50..]
            .iter()
            .map(|plan| s.spawn(|| session(&r, &sec, &p0.addr, &dealer.addr, plan)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (mpc, plan)) in logits.iter().zip(&plans[50..]).enumerate() {
        assert_agrees(
            mpc,
            &plaintext_logits(&plan.batches),
            &format!("concurrent {i}"),
        );
    }
    assert_eq!(p0.wait_sessions(58, T), (58, 0));
    assert_eq!(dealer.wait_sessions(58, T), (58, 0));
    // Log lines carry ids, shapes and counts: the 1×16 bucket, no logit.
    let l = p0.lines.lock().unwrap();
    assert!(l.iter().any(|x| x.contains("[1x16]")), "{l:?}");
}

#[test]
fn the_cli_client_prints_labels_and_batches_in_buckets() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path());
    let dealer = Service::dealer(&certs, "127.0.0.1:0");
    let p0 = Service::serve(&certs, &dealer.addr, 2);
    let out = tmp.path().join("preds.json");
    let o = Command::new(env!("CARGO_BIN_EXE_mpcformer"))
        .args(["mpc", "client", "--model"])
        .arg(export().join("p1"))
        .args(["--peer", &p0.addr, "--dealer", &dealer.addr, "--certs"])
        .arg(&certs)
        .args(["--task", "sst2", "--data"])
        .arg(repo().join("data/quickstart"))
        .args(["--limit", "10", "--batch-size", "4", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{so}\n{se}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 10);
    // Batches of 4, 4, 2, each padded to a bucket length.
    let shapes: Vec<(u64, u64)> = v["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_u64().unwrap(), s[1].as_u64().unwrap()))
        .collect();
    assert_eq!(shapes.iter().map(|s| s.0).sum::<u64>(), 10);
    assert!(
        shapes.iter().all(|s| [16, 32, 64].contains(&s.1)),
        "{shapes:?}"
    );
    // Predictions in input order, against the plaintext model on the same sentences.
    let r = Reference::new();
    let qs = sentences(10);
    for (i, (p, q)) in preds.iter().zip(&qs).enumerate() {
        assert_eq!(p["index"], i);
        assert_eq!(p["text"], q.text.as_str());
        let plan = r.plan(std::slice::from_ref(q), 1);
        let plain = plaintext_logits(&plan.batches);
        // The export's id2label (GLUE's SST-2 labels are "0" and "1").
        let label = r.cfg.model.labels[usize::from(plain[1] > plain[0])].as_str();
        assert_eq!(p["label"], label, "{i}: {p}");
        let probs: Vec<f64> = p["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(so.contains(label), "{so}");
    }
    assert!(p0.lines.lock().unwrap().iter().any(|x| x.contains("x16")));
}

#[test]
fn a_client_killed_mid_session_leaves_the_server_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path());
    let dealer = Service::dealer(&certs, "127.0.0.1:0");
    let p0 = Service::serve(&certs, &dealer.addr, 1);
    let (mut c, _) = long_client(&certs, &p0.addr, &dealer.addr, 200);
    std::thread::sleep(Duration::from_millis(300));
    c.kill().unwrap();
    c.wait().unwrap();
    // With one slot, the next client is served only once the killed session has been let go,
    // which the server's 10 s timeout bounds (a killed process closes its sockets at once).
    let t = Instant::now();
    let r = Reference::new();
    let plan = r.plan(&sentences(3), 8);
    let mpc = session(&r, &p1_security(&certs), &p0.addr, &dealer.addr, &plan);
    assert_agrees(&mpc, &plaintext_logits(&plan.batches), "after the kill");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(p0.wait_sessions(2, T), (2, 1));
}

#[test]
fn a_dealer_restart_fails_only_the_sessions_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path());
    let addr = free_addr();
    let dealer = Service::dealer(&certs, &addr);
    let p0 = Service::serve(&certs, &addr, 2);
    let (mut c, err) = long_client(&certs, &p0.addr, &addr, 200);
    // Well into the session: both parties hold their seeds and P1 is asking the dealer.
    std::thread::sleep(Duration::from_millis(500));
    drop(dealer);
    let status = c.wait().unwrap();
    assert!(!status.success());
    // The reader thread ends at the dead process's end of file.
    let msg: Vec<String> = err.iter().collect();
    let msg = msg.join("\n");
    assert!(
        msg.contains("dealer"),
        "the client's error names the dealer: {msg}"
    );
    let _dealer = Service::dealer(&certs, &addr);
    let r = Reference::new();
    let plan = r.plan(&sentences(4), 4);
    let mpc = session(&r, &p1_security(&certs), &p0.addr, &addr, &plan);
    assert_agrees(&mpc, &plaintext_logits(&plan.batches), "after the restart");
    assert_eq!(p0.wait_sessions(2, T), (2, 1));
}

#[test]
fn garbage_after_the_handshake_ends_only_its_own_session() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path());
    let dealer = Service::dealer(&certs, "127.0.0.1:0");
    let p0 = Service::serve(&certs, &dealer.addr, 4);
    let r = Reference::new();
    let sec = p1_security(&certs);
    let plan = r.plan(&sentences(8), 8);
    std::thread::scope(|s| {
        let honest = s.spawn(|| session(&r, &sec, &p0.addr, &dealer.addr, &plan));
        // A valid P1 certificate and hello, then frames of no protocol's shape.
        let (mut chan, _) = connect_p0(&p0.addr, &sec, &r.cfg.settings(), T).unwrap();
        let _ = chan.send("garbage", &[u64::MAX; 3]);
        let _ = chan.send("garbage", &[7; 1000]);
        let _ = chan.recv("garbage");
        let mpc = honest.join().unwrap();
        assert_agrees(&mpc, &plaintext_logits(&plan.batches), "beside the garbage");
    });
    assert_eq!(p0.wait_sessions(2, T), (2, 1));
    let mpc = session(&r, &sec, &p0.addr, &dealer.addr, &plan);
    assert_agrees(&mpc, &plaintext_logits(&plan.batches), "after the garbage");
}

#[test]
fn sigterm_lets_the_running_session_finish_and_takes_no_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path());
    let dealer = Service::dealer(&certs, "127.0.0.1:0");
    let mut p0 = Service::serve(&certs, &dealer.addr, 2);
    let (mut c, _) = long_client(&certs, &p0.addr, &dealer.addr, 24);
    p0.signal(libc::SIGTERM);
    assert!(c.wait().unwrap().success(), "the running session finished");
    let status = p0.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(p0.sessions(), (1, 0));
    assert!(
        std::net::TcpStream::connect(&p0.addr).is_err(),
        "no new session"
    );
}
