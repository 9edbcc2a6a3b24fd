//! `mpcformer mpc …`: secure inference from the command line.
//!
//! - `mpc run --model <export> (--task T [--data D] [--split S] [--limit N] | --batch F)`:
//!   tokenises, runs the plaintext model for reference, then starts the dealer (a thread of
//!   this process) and the two parties (this binary re-executed as `mpc party --party 0|1`,
//!   over TCP on loopback), and reports accuracy under MPC, agreement with plaintext, max
//!   |logit difference| and per-op wall time / rounds / bytes.
//! - `mpc bench --shape bert-base|minilm|<export> --variants teacher,quad,quad+2relu,quad+2quad
//!   --seq 128,512 --batch 1`: one private forward per variant and length on random ids (random
//!   weights for a named shape), one per-op table per length (time, rounds, bytes per party),
//!   totals, LAN/WAN modelled times and every variant's speedup over the teacher.
//! - `mpc party` / `mpc dealer`: one party or the dealer, e.g. on separate machines.
//! - `mpc certs --out DIR`: a CA and a certificate and key per role ([`super::tls`]); every
//!   role then takes `--certs DIR`. Links are mutual TLS 1.3 unless `--insecure-plaintext`;
//!   `mpc run` and `mpc bench` make throwaway certificates for their loopback session.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::Party;
use super::client::{self, Query, public_dir, run_session};
use super::dealer::{Dealer, DealerStats};
use super::model::{Input, MpcConfig, PartyReport, PlainWeights, PreparedP0, ops_json, run_party};
use super::net::{LAN, NetModel, OpStats, Transport, WAN};
use super::ring::matmul_kernel_name;
use super::service::{Server, ServiceOptions, Shutdown, run_dealer};
use super::session::{Security, accept_p1, connect_dealer, connect_p0, serve_dealer};
use super::tls::{CertPaths, CertSet, Role, TlsIdentity};
use super::trunc::Truncation;
use crate::data::{self, Fields, Label, Order, Task, Tokenized};
use crate::export::format::{P1_DIR, PUBLIC_MANIFEST};
use crate::io::{HostTensor, load_safetensors, save_safetensors};
use crate::model::shapes::Shape;
use crate::model::{Act, Approx, Attn, Overrides};
use crate::tokenize::HostBatch;

#[derive(Args, Debug)]
pub struct MpcArgs {
    #[command(subcommand)]
    pub command: MpcCommand,
}

#[derive(Subcommand, Debug)]
pub enum MpcCommand {
    /// Run an exported model (a student or the teacher) under 2-party MPC on a task's data or a
    /// saved batch, and compare with plaintext.
    #[command(after_help = "Examples:
  mpcformer mpc run --model exports/quickstart --task sst2 --data ../shared/data/glue --limit 200
  mpcformer mpc run --model exports/quickstart --batch tests/fixtures/tiny-bert/batch0.safetensors --output mpc.json")]
    Run(RunArgs),
    /// Private forward passes on random inputs, one per variant and sequence length: per-op
    /// wall time, rounds, bytes; LAN/WAN modelled times; speedups over the teacher.
    #[command(after_help = "Examples:
  mpcformer mpc bench --shape bert-base --seq 128 --batch 1 --output mpc-bench.json
  mpcformer mpc bench --variants teacher,quad,quad+2relu,quad+2quad --seq 128,512 --output speedup.json
  mpcformer mpc bench --shape exports/quickstart --seq 64

Variants: teacher (= gelu+softmax), quad (= quad+softmax), quad+2relu, quad+2quad, or any
<act>+<attn> with act gelu|gelu_tanh|relu|quad and attn softmax|2quad|2relu.")]
    Bench(BenchArgs),
    /// One party (P0 holds the model, P1 the inputs), e.g. on its own machine.
    #[command(
        after_help = "Example (three machines; copy ca.pem and each role's .pem/.key to it):
  mpcformer mpc certs --out certs
  mpcformer mpc dealer --certs certs --listen D:7001
  mpcformer mpc party --party 0 --certs certs --model exports/quickstart --listen P0:7000 --dealer D:7001
  mpcformer mpc party --party 1 --certs certs --model exports/quickstart --peer P0:7000 --dealer D:7001 \\
      --inputs batch.safetensors --report p1.json

D and P0 are the addresses to listen on (an interface's address, or 0.0.0.0 for all: the links
are mutual TLS, so only holders of this CA's certificates get past the handshake)."
    )]
    Party(PartyArgs),
    /// The dealer: hands out seeds and P1's shares of the products, session after session.
    #[command(
        after_help = "Serves sessions until SIGTERM or Ctrl-C (then lets the running ones finish);
each session gets seeds of its own. Example:
  mpcformer mpc dealer --listen 0.0.0.0:7001 --certs certs --max-sessions 8"
    )]
    Dealer(DealerArgs),
    /// P0 as a service: loads an export once and serves private inference to clients (P1).
    #[command(
        after_help = "Example (see `mpc client`; the dealer on another machine):
  mpcformer mpc serve --model exports/quickstart --listen 0.0.0.0:7000 --dealer D:7001 --certs certs

One log line per session (id, client certificate fingerprint, shapes, times, bytes, rounds; no
value). SIGTERM or Ctrl-C: no new sessions, running ones finish."
    )]
    Serve(ServeArgs),
    /// P1 as a client of `mpc serve`: classifies sentences it keeps private.
    #[command(after_help = "Examples:
  mpcformer mpc client --model exports/quickstart/p1 --peer P0:7000 --dealer D:7001 --certs certs \\
      --text \"a gorgeous, witty, seductive movie.\"
  mpcformer mpc client --model exports/minilm-rte/p1 --peer P0:7000 --dealer D:7001 --certs certs \\
      --text \"A man is playing a guitar.\" --text-pair \"A man plays music.\"
  mpcformer mpc client --model exports/quickstart/p1 --peer P0:7000 --dealer D:7001 --certs certs \\
      --task sst2 --data ../shared/data/glue --limit 32 --batch-size 8 --output preds.json

The client reads only the export's public part (p1/: config, tokenizer, plans).")]
    Client(ClientArgs),
    /// Writes a CA and a certificate and key for each role (P0, P1, dealer) for `--certs`.
    #[command(
        after_help = "Layout of DIR: ca.pem (every role), p0.pem + p0.key, p1.pem + p1.key,
dealer.pem + dealer.key. Keys are written with mode 0600; the CA's key is not kept. Each role
needs ca.pem and its own pair only; certificates are valid for a year."
    )]
    Certs(CertsArgs),
}

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace existing keys (every role's certificate must then be copied again).
    #[arg(long)]
    pub force: bool,
}

/// How a role secures its links.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Certificates directory (`mpc certs`): `ca.pem` and this role's `<role>.pem` / `.key`.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// CA certificate (overrides `--certs`'s).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This role's certificate (overrides `--certs`'s).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This role's private key (overrides `--certs`'s).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// No TLS: nothing encrypted, roles not authenticated. Loopback tests and benchmarks only.
    #[arg(long, conflicts_with_all = ["certs", "ca", "cert", "key"])]
    pub insecure_plaintext: bool,
}

const PLAINTEXT_WARNING: &str = "warning: --insecure-plaintext: the MPC links are neither encrypted nor authenticated (anyone who can connect can take a role); use it on loopback only";

impl TlsArgs {
    fn security(&self, role: Role) -> Result<Security> {
        if self.insecure_plaintext {
            eprintln!("{role}: {PLAINTEXT_WARNING}");
            return Ok(Security::Plaintext);
        }
        let paths = CertPaths::resolve(
            self.certs.as_deref(),
            role,
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )
        .with_context(|| {
            format!("{role}: give --certs DIR (from `mpcformer mpc certs`), or --ca, --cert and --key; or --insecure-plaintext on loopback")
        })?;
        Ok(Security::Tls(std::sync::Arc::new(TlsIdentity::load(
            role, &paths,
        )?)))
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Export directory (`mpcformer export`).
    #[arg(long)]
    pub model: PathBuf,
    /// Task whose data to run (`sst2`, `rte`, ...).
    #[arg(long)]
    pub task: Option<String>,
    /// Data spec (as `eval --data`); default the task's Hub dataset.
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// First N examples only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// A saved batch (`input_ids`, `attention_mask`[, `token_type_ids`]) instead of a task.
    #[arg(long, conflicts_with = "task")]
    pub batch: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Seconds a party waits for a message before giving up.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Softmax exp iterations n of `(1 + x/2^n)^(2^n)` (default: 8, more if the export's range
    /// needs it).
    #[arg(long)]
    pub exp_iters: Option<u32>,
    /// Write the report as JSON.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Plain TCP between the in-process roles instead of TLS with throwaway certificates.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// `bert-base`, `minilm` (random weights, default ranges) or an export directory.
    #[arg(long, default_value = "bert-base")]
    pub shape: String,
    /// Comma-separated approximation variants (default: the export's own, or quad+2quad for a
    /// named shape).
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,
    /// Comma-separated sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub seq: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Softmax exp iterations (default 8).
    #[arg(long)]
    pub exp_iters: Option<u32>,
    /// No offline phase: every round draws its correlated randomness and P1 asks the dealer
    /// during the round (as CrypTen's timing does); needed where one forward pass's material
    /// does not fit in memory (the teacher at seq 512).
    #[arg(long)]
    pub no_offline: bool,
    /// `exact` (default) or `local`: how the hot spots truncate (see `mpc::trunc`).
    #[arg(long, default_value = "exact")]
    pub truncation: String,
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Plain TCP between the in-process roles instead of TLS with throwaway certificates.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

#[derive(Args, Debug)]
pub struct PartyArgs {
    /// 0 (holds the model) or 1 (holds the inputs).
    #[arg(long)]
    pub party: usize,
    /// Export directory, or a shape name (`bert-base`, `minilm`: random weights).
    #[arg(long)]
    pub model: String,
    /// Approximations to run instead of the model's own (`teacher`, `quad+2quad`, ...).
    #[arg(long)]
    pub variant: Option<String>,
    /// Softmax exp iterations.
    #[arg(long)]
    pub exp_iters: Option<u32>,
    /// No offline phase: correlated randomness drawn round by round (less memory).
    #[arg(long)]
    pub no_offline: bool,
    /// `exact` (default) or `local`: how the hot spots truncate; both parties must agree.
    #[arg(long, default_value = "exact")]
    pub truncation: String,
    /// P0: address to listen on for P1 (port 0: any; the address is printed).
    #[arg(long)]
    pub listen: Option<String>,
    /// P1: P0's address.
    #[arg(long)]
    pub peer: Option<String>,
    /// The dealer's address.
    #[arg(long)]
    pub dealer: String,
    /// P1: batches (`input_ids`, `attention_mask`, `token_type_ids`, or `N.input_ids`, ...).
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Write this party's report (per-op counters; P1: the logits) as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Args, Debug)]
pub struct DealerArgs {
    #[arg(long)]
    pub listen: String,
    /// Seconds a session may wait for its parties, and for each of P1's requests.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Sessions served at once; more are refused until one ends.
    #[arg(long, default_value_t = 8)]
    pub max_sessions: usize,
    /// Stop after this many sessions (default: serve until SIGTERM or Ctrl-C).
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Also append each session's line as JSON to this file.
    #[arg(long)]
    pub log_json: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Export directory (`mpcformer export`).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on for clients (port 0: any; the address is printed).
    #[arg(long)]
    pub listen: String,
    /// The dealer's address.
    #[arg(long)]
    pub dealer: String,
    /// Sessions served at once; later clients wait for a slot (up to --timeout-s).
    #[arg(long, default_value_t = 4)]
    pub max_sessions: usize,
    /// Stop after this many sessions (default: serve until SIGTERM or Ctrl-C).
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Seconds to wait for a client's message (a client gone silent frees its slot after it).
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Softmax exp iterations (the clients must pass the same).
    #[arg(long)]
    pub exp_iters: Option<u32>,
    /// `exact` (default) or `local` truncation (the clients must pass the same).
    #[arg(long, default_value = "exact")]
    pub truncation: String,
    /// Also append each session's line as JSON to this file.
    #[arg(long)]
    pub log_json: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The export's public part (`<export>/p1/`) or the export itself.
    #[arg(long)]
    pub model: PathBuf,
    /// The server's (P0's) address.
    #[arg(long)]
    pub peer: String,
    /// The dealer's address.
    #[arg(long)]
    pub dealer: String,
    /// A sentence to classify (repeatable).
    #[arg(long, conflicts_with = "task")]
    pub text: Vec<String>,
    /// The second sentence of a pair task, one per --text.
    #[arg(long)]
    pub text_pair: Vec<String>,
    /// Classify a task's split instead (as `eval`: --data, --split, --limit, --text-field).
    #[arg(long)]
    pub task: Option<String>,
    /// Data spec (as `eval --data`): a GLUE folder or file, .jsonl/.csv/.parquet, hub:...
    #[arg(long, requires = "task")]
    pub data: Option<String>,
    #[arg(long, default_value = "dev", requires = "task")]
    pub split: String,
    /// First N examples only.
    #[arg(long, requires = "task")]
    pub limit: Option<usize>,
    /// Text field(s) of JSONL/CSV/parquet/TSV files (two for a pair).
    #[arg(long = "text-field", value_delimiter = ',', requires = "task")]
    pub text_fields: Vec<String>,
    /// Sentences per batch within the session.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Comma-separated bucket lengths each batch is padded to, or `none` (to its longest).
    #[arg(long, default_value = "16,32,64,128,256,512")]
    pub buckets: String,
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Softmax exp iterations (as the server's).
    #[arg(long)]
    pub exp_iters: Option<u32>,
    /// `exact` (default) or `local` truncation (as the server's).
    #[arg(long, default_value = "exact")]
    pub truncation: String,
    /// Write the predictions and the session's counters as JSON.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

pub fn main(args: MpcArgs) -> Result<()> {
    match args.command {
        MpcCommand::Run(a) => run(a),
        MpcCommand::Bench(a) => bench(a),
        MpcCommand::Party(a) => party(a),
        MpcCommand::Dealer(a) => dealer_main(a),
        MpcCommand::Serve(a) => serve_main(a),
        MpcCommand::Client(a) => client_main(a),
        MpcCommand::Certs(a) => certs_main(a),
    }
}

/// A model spec: a named shape (random weights) or an export directory.
fn shape_of(spec: &str) -> Option<Shape> {
    match spec {
        "bert-base" => Some(Shape::BertBase),
        "minilm" => Some(Shape::Minilm),
        _ => None,
    }
}

/// A variant name: `teacher` (GeLU + softmax), `quad` (Quad + softmax), or `<act>+<attn>`.
pub fn parse_variant(name: &str) -> Result<Approx> {
    let n = name.trim().to_ascii_lowercase();
    let (act, attn) = match n.as_str() {
        "teacher" => ("gelu", "softmax"),
        _ => match n.split_once('+') {
            Some((a, b)) => (a, b),
            None => (n.as_str(), "softmax"),
        },
    };
    let act: Act = act
        .parse()
        .map_err(|e: String| anyhow::anyhow!("variant `{name}`: {e}"))?;
    let attn: Attn = attn
        .parse()
        .map_err(|e: String| anyhow::anyhow!("variant `{name}`: {e}"))?;
    Ok(Approx::new(act, attn))
}

fn load_spec(
    spec: &str,
    load_weights: bool,
    variant: Option<&str>,
    exp_iters: Option<u32>,
) -> Result<(MpcConfig, Option<PlainWeights>)> {
    let approx = variant.map(parse_variant).transpose()?;
    match shape_of(spec) {
        Some(shape) => {
            let mc = shape.config(approx.unwrap_or(Approx::new(Act::Quad, Attn::TwoQuad)));
            let w = load_weights.then(|| PlainWeights::random(&mc, 0));
            let cfg = MpcConfig::with_exp_iters(mc, super::DEFAULT_FRAC_BITS, None, exp_iters)?;
            Ok((cfg, w))
        }
        None => {
            let dir = Path::new(spec);
            let cfg = MpcConfig::from_export_with(dir, approx, exp_iters)
                .with_context(|| format!("{}: reading the export", dir.display()))?;
            let w = if load_weights {
                Some(PlainWeights::from_export(dir)?)
            } else {
                None
            };
            Ok((cfg, w))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs files.
// ---------------------------------------------------------------------------------------------

fn write_inputs(path: &Path, inputs: &[HostBatch]) -> Result<()> {
    let mut map = BTreeMap::new();
    for (i, b) in inputs.iter().enumerate() {
        let shape = vec![b.batch, b.seq];
        for (name, v) in [
            ("input_ids", &b.input_ids),
            ("attention_mask", &b.attention_mask),
            ("token_type_ids", &b.token_type_ids),
        ] {
            map.insert(
                format!("{i}.{name}"),
                HostTensor::I64 {
                    shape: shape.clone(),
                    data: v.clone(),
                },
            );
        }
    }
    save_safetensors(path, &map, None)
}

/// Batches from a file: `N.input_ids`, ... or a single `input_ids`, ...
pub fn read_inputs(path: &Path) -> Result<Vec<HostBatch>> {
    let map = load_safetensors(path)?;
    let one = |prefix: &str| -> Result<Option<HostBatch>> {
        let Some(ids) = map.get(&format!("{prefix}input_ids")) else {
            return Ok(None);
        };
        let shape = ids.shape().to_vec();
        if shape.len() != 2 {
            bail!(
                "{}: `{prefix}input_ids` must be [batch, seq]",
                path.display()
            );
        }
        let input_ids = ids.to_i64()?;
        let get = |k: &str, default: i64| -> Result<Vec<i64>> {
            match map.get(&format!("{prefix}{k}")) {
                Some(t) if t.shape() == shape.as_slice() => t.to_i64(),
                Some(_) => bail!(
                    "{}: `{prefix}{k}` has another shape than the ids",
                    path.display()
                ),
                None => Ok(vec![default; input_ids.len()]),
            }
        };
        Ok(Some(HostBatch {
            attention_mask: get("attention_mask", 1)?,
            token_type_ids: get("token_type_ids", 0)?,
            input_ids,
            batch: shape[0],
            seq: shape[1],
        }))
    };
    if let Some(b) = one("")? {
        return Ok(vec![b]);
    }
    let mut out = Vec::new();
    while let Some(b) = one(&format!("{}.", out.len()))? {
        out.push(b);
    }
    if out.is_empty() {
        bail!("{}: no `input_ids` tensor", path.display());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Party and dealer processes.
// ---------------------------------------------------------------------------------------------

fn party(a: PartyArgs) -> Result<()> {
    let p = Party::from_index(a.party).context("--party must be 0 or 1")?;
    let timeout = Duration::from_secs(a.timeout_s);
    let sec = a.tls.security(p.into())?;
    let (mut cfg, weights) =
        load_spec(&a.model, p == Party::P0, a.variant.as_deref(), a.exp_iters)?;
    cfg.offline = !a.no_offline;
    cfg.truncation = Truncation::parse(&a.truncation)?;
    let settings = cfg.settings();
    let report = match p {
        Party::P0 => {
            let listen = a.listen.as_deref().context("P0 needs --listen")?;
            let l = TcpListener::bind(listen).with_context(|| format!("P0: binding {listen}"))?;
            println!("MPC_LISTENING {}", l.local_addr()?);
            std::io::Write::flush(&mut std::io::stdout())?;
            let (chan, sid) = accept_p1(&l, &sec, &settings, timeout)?;
            let peer = chan.peer_addr().to_string();
            let dealer = connect_dealer(&a.dealer, &sec, p, sid, None, timeout)?;
            run_party(p, cfg, weights.as_ref(), None, Box::new(chan), dealer)
                .with_context(|| format!("P0: session with P1 at {peer}"))?
        }
        Party::P1 => {
            let peer = a.peer.as_deref().context("P1 needs --peer")?;
            let path = a.inputs.as_deref().context("P1 needs --inputs")?;
            let inputs: Vec<Input> = read_inputs(path)?.iter().map(Input::from_host).collect();
            let (chan, sid) = connect_p0(peer, &sec, &settings, timeout)?;
            // For scripts and tests: the session with P0 has begun.
            println!("MPC_CONNECTED");
            std::io::Write::flush(&mut std::io::stdout())?;
            let dealer = connect_dealer(&a.dealer, &sec, p, sid, None, timeout)?;
            run_party(p, cfg, None, Some(&inputs), Box::new(chan), dealer)
                .with_context(|| format!("P1: session with P0 at {peer}"))?
        }
    };
    if let Some(path) = &a.report {
        crate::io::write_atomic(path, serde_json::to_string(&report)?.as_bytes())?;
    }
    Ok(())
}

/// Serves one session on `l`: both parties' seeds, then P1's requests.
fn dealer_serve(l: TcpListener, sec: &Security, timeout: Duration) -> Result<DealerStats> {
    let mut dealer = Dealer::new();
    serve_dealer(&l, sec, &mut dealer, timeout)?;
    Ok(dealer.stats)
}

fn dealer_main(a: DealerArgs) -> Result<()> {
    let sec = a.tls.security(Role::Dealer)?;
    let l =
        TcpListener::bind(&a.listen).with_context(|| format!("dealer: binding {}", a.listen))?;
    let shutdown = Shutdown::on_signals().context("dealer: installing the signal handlers")?;
    // For scripts and tests (port 0 picks one).
    println!("MPC_LISTENING {}", l.local_addr()?);
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!(
        "dealer listening on {} ({}), up to {} sessions at once",
        l.local_addr()?,
        sec.transport().name(),
        a.max_sessions
    );
    let opts = ServiceOptions {
        max_sessions: a.max_sessions,
        timeout: Duration::from_secs(a.timeout_s),
        stop_after: a.sessions,
    };
    let t = run_dealer(l, &sec, &opts, &shutdown, a.log_json.as_deref())?;
    eprintln!(
        "dealer stopped: {} sessions ({} failed), {} connections dropped",
        t.sessions, t.failed, t.dropped_connections
    );
    Ok(())
}

fn serve_main(a: ServeArgs) -> Result<()> {
    let sec = a.tls.security(Role::P0)?;
    let model = a.model.to_string_lossy().to_string();
    let (mut cfg, weights) = load_spec(&model, true, None, a.exp_iters)?;
    cfg.truncation = Truncation::parse(&a.truncation)?;
    let l = TcpListener::bind(&a.listen).with_context(|| format!("serve: binding {}", a.listen))?;
    let shutdown = Shutdown::on_signals().context("serve: installing the signal handlers")?;
    println!("MPC_LISTENING {}", l.local_addr()?);
    eprintln!(
        "serving {} ({} labels, {}) on {} ({}), dealer {}, up to {} sessions at once",
        a.model.display(),
        cfg.model.num_labels,
        cfg.model.approx.label(),
        l.local_addr()?,
        sec.transport().name(),
        a.dealer,
        a.max_sessions
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    let prepared = PreparedP0::new(cfg, &weights.expect("P0 loads the weights"))?;
    eprintln!(
        "weights encoded and masked once, in {:.2} s",
        prepared.setup_s
    );
    let server = Server {
        prepared,
        sec,
        dealer: a.dealer,
        opts: ServiceOptions {
            max_sessions: a.max_sessions,
            timeout: Duration::from_secs(a.timeout_s),
            stop_after: a.sessions,
        },
    };
    let t = server.run(l, &shutdown, a.log_json.as_deref())?;
    eprintln!(
        "serve stopped: {} sessions ({} failed), {} connections dropped",
        t.sessions, t.failed, t.dropped_connections
    );
    Ok(())
}

/// The client's sentences: from the command line, or a task's split.
fn client_queries(a: &ClientArgs) -> Result<Vec<Query>> {
    if let Some(task_name) = &a.task {
        let task = Task::find(task_name).map_err(anyhow::Error::msg)?;
        let split = *task
            .resolve_splits(&a.split)
            .map_err(anyhow::Error::msg)?
            .first()
            .context("no split")?;
        let fields = Fields {
            text: a.text_fields.clone(),
            label: None,
        };
        let mut set = data::load(task, a.data.as_deref(), split, &fields)?;
        if let Some(n) = a.limit {
            set.examples.truncate(n);
        }
        return Ok(set
            .examples
            .into_iter()
            .map(|e| Query {
                text: e.text_a,
                text_pair: e.text_b,
            })
            .collect());
    }
    if a.text.is_empty() {
        bail!("give --text (and --text-pair for a pair task), or --task with --data");
    }
    if !a.text_pair.is_empty() && a.text_pair.len() != a.text.len() {
        bail!(
            "{} --text but {} --text-pair: give one --text-pair per --text, or none",
            a.text.len(),
            a.text_pair.len()
        );
    }
    Ok(a.text
        .iter()
        .enumerate()
        .map(|(i, t)| Query {
            text: t.clone(),
            text_pair: a.text_pair.get(i).cloned(),
        })
        .collect())
}

fn parse_buckets(s: &str) -> Result<Vec<usize>> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut b = s
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("--buckets: `{x}` is not a positive length"))
        })
        .collect::<Result<Vec<_>>>()?;
    b.sort_unstable();
    Ok(b)
}

fn client_main(a: ClientArgs) -> Result<()> {
    let sec = a.tls.security(Role::P1)?;
    let dir = public_dir(&a.model);
    let dir_s = dir.to_string_lossy().to_string();
    let (mut cfg, _) = load_spec(&dir_s, false, None, a.exp_iters)?;
    cfg.truncation = Truncation::parse(&a.truncation)?;
    let max_len = client::max_length(&dir)?;
    let tok = crate::tokenize::TextTokenizer::from_dir(&dir, max_len)?;
    let queries = client_queries(&a)?;
    let plan = client::plan(&tok, &queries, a.batch_size, &parse_buckets(&a.buckets)?)
        .map_err(anyhow::Error::msg)?;
    let report = run_session(
        cfg.clone(),
        &sec,
        &a.peer,
        &a.dealer,
        &plan.batches,
        Duration::from_secs(a.timeout_s),
        |sid| {
            eprintln!(
                "session {} with {}: {} sentences in {} batches",
                sid.short(),
                a.peer,
                queries.len(),
                plan.batches.len()
            )
        },
    )
    .map_err(|e| session_error(e, &a.peer))?;
    let preds = client::predictions(&report.logits, &plan.order, &cfg);
    for (q, p) in queries.iter().zip(&preds) {
        print_prediction(q, p, &cfg.model.labels);
    }
    let t = totals(&report, false);
    eprintln!(
        "{} sentences in {} batches over {}: setup {:.2} s, offline {:.2} s, online {:.2} s, {} rounds, sent {:.1} MiB, received {:.1} MiB",
        queries.len(),
        report.batches,
        sec.transport().name(),
        report.setup_s,
        report.offline_s,
        report.forward_s,
        t.rounds,
        mib(t.bytes_sent),
        mib(t.bytes_recv)
    );
    write_json(
        &a.output,
        &json!({
            "model": dir_s,
            "transport": sec.transport().name(),
            "n": queries.len(),
            "batch_size": a.batch_size,
            "shapes": report.shapes,
            "setup_s": report.setup_s,
            "offline_s": report.offline_s,
            "online_s": report.forward_s,
            "rounds": t.rounds,
            "bytes_sent": t.bytes_sent,
            "bytes_recv": t.bytes_recv,
            "dealer_bytes": t.dealer_bytes,
            "predictions": preds.iter().zip(&queries).map(|(p, q)| {
                let mut v = serde_json::to_value(p).unwrap_or_default();
                v["text"] = json!(q.text);
                v["text_pair"] = json!(q.text_pair);
                v
            }).collect::<Vec<_>>(),
        }),
    )
}

/// P1's session error, with what to look at when the server hung up.
fn session_error(e: super::MpcError, peer: &str) -> anyhow::Error {
    let hint = match e {
        super::MpcError::PeerClosed { .. } => {
            " (the server ended the session: its log says why, e.g. a dealer it could not reach, its --timeout-s or its shutdown)"
        }
        _ => "",
    };
    anyhow::Error::new(e).context(format!("P1: session with the server at {peer}{hint}"))
}

/// One answer line: index, the label with every class's probability (or the score), the text.
fn print_prediction(q: &Query, p: &client::Prediction, labels: &[String]) {
    let answer = match (&p.label, p.score) {
        (_, Some(s)) => format!("score {s:.4}"),
        (Some(l), _) => {
            let probs: Vec<String> = p
                .probabilities
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    let name = labels.get(j).cloned().unwrap_or(j.to_string());
                    format!("{name}: {v:.4}")
                })
                .collect();
            format!("{l}  [{}]", probs.join(", "))
        }
        _ => String::new(),
    };
    let text = match &q.text_pair {
        Some(b) => format!("{} ||| {b}", q.text),
        None => q.text.clone(),
    };
    let short: String = text.chars().take(60).collect();
    let ell = if short.len() < text.len() { "…" } else { "" };
    println!("{:>4}  {answer}  {short}{ell}", p.index);
}

fn certs_main(a: CertsArgs) -> Result<()> {
    let written = CertSet::generate()?.write_dir(&a.out, a.force)?;
    for p in written {
        println!("wrote {}", p.display());
    }
    println!(
        "copy ca.pem and each role's <role>.pem and <role>.key to its machine; keep the .key files private"
    );
    Ok(())
}

struct Launched {
    p0: PartyReport,
    p1: PartyReport,
    dealer: DealerStats,
    wall_s: f64,
    transport: Transport,
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The dealer's security and the parties' flags for a loopback session: TLS with certificates
/// made for this session alone (written into `tmp`, which goes with it), or plaintext.
fn loopback_security(tmp: &Path, plaintext: bool) -> Result<(Security, Vec<String>)> {
    if plaintext {
        eprintln!("{PLAINTEXT_WARNING}");
        return Ok((Security::Plaintext, vec!["--insecure-plaintext".into()]));
    }
    let dir = tmp.join("certs");
    let set = CertSet::generate()?;
    set.write_dir(&dir, false)?;
    let sec = Security::Tls(std::sync::Arc::new(set.identity(Role::Dealer)?));
    Ok((
        sec,
        vec!["--certs".into(), dir.to_string_lossy().into_owned()],
    ))
}

/// The export's public part (`p1/`), which P1 loads; the whole export where it has none.
fn public_part(model: &str) -> String {
    let p1_part = Path::new(model).join(P1_DIR);
    if p1_part.join(PUBLIC_MANIFEST).is_file() {
        p1_part.to_string_lossy().to_string()
    } else {
        model.to_string()
    }
}

/// Starts P0 listening on a free loopback port and reads the address it announces.
fn start_p0(mut cmd: Command) -> Result<(Child, String)> {
    let mut c0 = cmd
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting P0")?;
    let mut line = String::new();
    BufReader::new(c0.stdout.take().expect("piped")).read_line(&mut line)?;
    match line.trim().strip_prefix("MPC_LISTENING ") {
        Some(addr) => Ok((c0, addr.to_string())),
        None => {
            kill(&mut c0);
            bail!("P0 did not start (see its error above)")
        }
    }
}

/// Starts the dealer (thread) and both parties (processes) on loopback; `extra` goes to both
/// parties' command lines (`--variant`, `--exp-iters`).
fn launch(
    model: &str,
    inputs: &[HostBatch],
    timeout: Duration,
    extra: &[String],
    plaintext: bool,
) -> Result<Launched> {
    let tmp = tempfile::tempdir()?;
    let inputs_path = tmp.path().join("inputs.safetensors");
    write_inputs(&inputs_path, inputs)?;
    let (sec, sec_args) = loopback_security(tmp.path(), plaintext)?;
    let transport = sec.transport();
    let dl = TcpListener::bind("127.0.0.1:0")?;
    let dealer_addr = dl.local_addr()?.to_string();
    let dealer = std::thread::spawn(move || dealer_serve(dl, &sec, timeout));
    let exe = std::env::current_exe()?;
    let t = Instant::now();
    // P1 gets the export's public part, as a client on another machine would: it never reads
    // the weights, the recipe or the metrics.
    let p1_model = public_part(model);
    let common = |p: usize| {
        let mut c = Command::new(&exe);
        let m = if p == 1 { p1_model.as_str() } else { model };
        c.args(["mpc", "party", "--party", &p.to_string(), "--model", m])
            .args(["--dealer", &dealer_addr])
            .args(["--timeout-s", &timeout.as_secs().to_string()])
            .args(&sec_args)
            .args(extra)
            .arg("--report")
            .arg(tmp.path().join(format!("p{p}.json")));
        c
    };
    let (mut c0, addr) = start_p0(common(0))?;
    let mut c1 = match common(1)
        .args(["--peer", &addr])
        .arg("--inputs")
        .arg(&inputs_path)
        // Its only stdout line is MPC_CONNECTED, for scripts; errors go to stderr.
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            kill(&mut c0);
            return Err(e).context("starting P1");
        }
    };
    let s1 = c1.wait()?;
    let s0 = c0.wait()?;
    let wall_s = t.elapsed().as_secs_f64();
    let dstats = dealer
        .join()
        .map_err(|_| anyhow::anyhow!("dealer thread panicked"))?;
    if !s0.success() || !s1.success() {
        bail!("MPC session failed (P0: {s0}, P1: {s1}); the parties' errors are above");
    }
    let read = |p: usize| -> Result<PartyReport> {
        let path = tmp.path().join(format!("p{p}.json"));
        Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
    };
    Ok(Launched {
        p0: read(0)?,
        p1: read(1)?,
        dealer: dstats?,
        wall_s,
        transport,
    })
}

// ---------------------------------------------------------------------------------------------
// Reports.
// ---------------------------------------------------------------------------------------------

fn totals(r: &PartyReport, skip_setup: bool) -> OpStats {
    let mut t = OpStats::default();
    for (l, s) in &r.ops {
        if skip_setup && (l == "setup" || l == "offline") {
            continue;
        }
        t.add(s);
    }
    t
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn op_table(l: &Launched) -> String {
    let mut s = format!(
        "{:<18} {:>9} {:>7} {:>12} {:>12} {:>11}\n",
        "op", "wall s", "rounds", "P0 sent MiB", "P1 sent MiB", "dealer MiB"
    );
    for (label, s0) in &l.p0.ops {
        let s1 =
            l.p1.ops
                .iter()
                .find(|(x, _)| x == label)
                .map(|x| x.1.clone())
                .unwrap_or_default();
        s += &format!(
            "{:<18} {:>9.3} {:>7} {:>12.2} {:>12.2} {:>11.2}\n",
            label,
            s0.wall_s.max(s1.wall_s),
            s0.rounds.max(s1.rounds),
            mib(s0.bytes_sent),
            mib(s1.bytes_sent),
            mib(s0.dealer_bytes + s1.dealer_bytes)
        );
    }
    s
}

fn summary_json(l: &Launched) -> Value {
    let (t0, t1) = (totals(&l.p0, true), totals(&l.p1, true));
    let rounds = t0.rounds.max(t1.rounds);
    let max_dir = t0.bytes_sent.max(t1.bytes_sent);
    let forward_s = l.p0.forward_s.max(l.p1.forward_s);
    let model = |m: NetModel| {
        json!({
            "rtt_s": m.rtt_s,
            "bits_per_s": m.bits_per_s,
            "comm_s": m.comm_time(rounds, max_dir),
            "total_s": m.total_time(forward_s, rounds, max_dir),
        })
    };
    let (s0, s1) = (
        l.p0.ops
            .iter()
            .find(|x| x.0 == "setup")
            .map(|x| x.1.clone())
            .unwrap_or_default(),
        l.p1.ops
            .iter()
            .find(|x| x.0 == "setup")
            .map(|x| x.1.clone())
            .unwrap_or_default(),
    );
    let offline_s = l.p0.offline_s.max(l.p1.offline_s);
    let enc_on = l.p0.encoder_s.max(l.p1.encoder_s);
    let enc_off = l.p0.encoder_offline_s.max(l.p1.encoder_offline_s);
    json!({
        // Online phase only (after the input's shape is known and the offline phase is done).
        "wall_s": forward_s,
        "online_s": forward_s,
        "offline_s": offline_s,
        "total_s": forward_s + offline_s,
        // The 12 (or n) encoder layers only: what CrypTen's bench times (hidden states in,
        // hidden states out; no embedding, pooler or classifier).
        "encoder_online_s": enc_on,
        "encoder_offline_s": enc_off,
        "encoder_total_s": enc_on + enc_off,
        "session_wall_s": l.wall_s,
        "setup_s": l.p0.setup_s.max(l.p1.setup_s),
        "setup_bytes_p0": s0.bytes_sent + s1.bytes_sent,
        "rounds": rounds,
        "bytes_per_party": [t0.bytes_sent, t1.bytes_sent],
        "dealer_bytes": l.dealer.bytes_sent + l.dealer.bytes_recv,
        "ops": ops_json(&l.p0, &l.p1),
        "lan": model(LAN),
        "wan": model(WAN),
        "lan_s": LAN.total_time(forward_s, rounds, max_dir),
        "wan_s": WAN.total_time(forward_s, rounds, max_dir),
        "transport": l.transport.name(),
        "matmul_kernel": matmul_kernel_name(),
        "threads": rayon::current_num_threads(),
    })
}

fn print_summary(l: &Launched, v: &Value) {
    print!("{}", op_table(l));
    println!(
        "transport: {}",
        match l.transport {
            Transport::Tls13 => "tls13 (mutual TLS 1.3, certificates made for this session)",
            Transport::Plaintext => "plaintext (--insecure-plaintext)",
        }
    );
    let b = &v["bytes_per_party"];
    println!(
        "forward (online): {:.3} s wall, {} rounds, P0 sent {:.2} MiB, P1 sent {:.2} MiB; dealer {:.2} MiB; setup (once per model) {:.3} s, {:.2} MiB",
        v["wall_s"].as_f64().unwrap_or(0.0),
        v["rounds"],
        mib(b[0].as_u64().unwrap_or(0)),
        mib(b[1].as_u64().unwrap_or(0)),
        mib(v["dealer_bytes"].as_u64().unwrap_or(0)),
        v["setup_s"].as_f64().unwrap_or(0.0),
        mib(v["setup_bytes_p0"].as_u64().unwrap_or(0)),
    );
    println!(
        "online {:.3} s + offline {:.3} s = total {:.3} s; encoder layers only: online {:.3} s + offline {:.3} s = {:.3} s",
        v["online_s"].as_f64().unwrap_or(0.0),
        v["offline_s"].as_f64().unwrap_or(0.0),
        v["total_s"].as_f64().unwrap_or(0.0),
        v["encoder_online_s"].as_f64().unwrap_or(0.0),
        v["encoder_offline_s"].as_f64().unwrap_or(0.0),
        v["encoder_total_s"].as_f64().unwrap_or(0.0),
    );
    println!(
        "modelled (measured wall + rounds·RTT + bytes/bandwidth): LAN {:.3} s, WAN {:.3} s",
        v["lan"]["total_s"].as_f64().unwrap_or(0.0),
        v["wan"]["total_s"].as_f64().unwrap_or(0.0)
    );
}

fn write_json(path: &Option<PathBuf>, v: &Value) -> Result<()> {
    if let Some(p) = path {
        crate::io::write_atomic(p, serde_json::to_string_pretty(v)?.as_bytes())?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// mpc bench / mpc run.
// ---------------------------------------------------------------------------------------------

/// Rows of the bench table: op labels grouped by what they compute.
const GROUPS: [(&str, &[&str]); 8] = [
    ("embedding", &["embedding"]),
    ("linear", &["linear"]),
    ("attention matmuls", &["attention_matmul"]),
    ("softmax | 2relu | 2quad", &["softmax", "2relu", "2quad"]),
    ("gelu | relu | quad", &["gelu", "relu", "quad"]),
    ("layernorm", &["layernorm"]),
    ("pooler + classifier", &["pooler", "classifier"]),
    ("output (logits to P1)", &["output"]),
];

/// (wall s, rounds, max bytes sent by one party) of a group of op labels in a summary.
fn group_stats(v: &Value, labels: &[&str]) -> (f64, u64, u64) {
    let (mut w, mut r, mut b0, mut b1) = (0.0, 0, 0, 0);
    for l in labels {
        let o = &v["ops"][*l];
        w += o["wall_s"].as_f64().unwrap_or(0.0);
        r += o["rounds"].as_u64().unwrap_or(0);
        b0 += o["bytes_sent_p0"].as_u64().unwrap_or(0);
        b1 += o["bytes_sent_p1"].as_u64().unwrap_or(0);
    }
    (w, r, b0.max(b1))
}

/// One table per sequence length: a column per variant (`s / rounds / MiB`, MiB the larger of
/// the two parties' sent bytes), totals, LAN/WAN, speedups over the teacher.
fn bench_table(seq: usize, runs: &[(String, Value)]) -> String {
    let cell = |w: f64, r: u64, b: u64| format!("{w:>7.2} {r:>6} {:>9.1}", mib(b));
    let mut s = format!(
        "seq {seq}: per party, online (s / rounds / MiB sent)\n{:<24}",
        "op"
    );
    for (name, _) in runs {
        s += &format!(" | {name:>24}");
    }
    s += "\n";
    for (row, labels) in GROUPS {
        s += &format!("{row:<24}");
        for (_, v) in runs {
            let (w, r, b) = group_stats(v, labels);
            s += &format!(" | {}", cell(w, r, b));
        }
        s += "\n";
    }
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let bytes = |v: &Value| {
        let b = &v["bytes_per_party"];
        b[0].as_u64().unwrap_or(0).max(b[1].as_u64().unwrap_or(0))
    };
    s += &format!("{:<24}", "total (online)");
    for (_, v) in runs {
        s += &format!(
            " | {}",
            cell(
                num(v, "wall_s"),
                v["rounds"].as_u64().unwrap_or(0),
                bytes(v)
            )
        );
    }
    s += "\n";
    let line = |s: &mut String, name: &str, f: &dyn Fn(&Value) -> f64| {
        *s += &format!("{name:<24}");
        for (_, v) in runs {
            *s += &format!(" | {:>24.2}", f(v));
        }
        *s += "\n";
    };
    line(&mut s, "offline s", &|v| num(v, "offline_s"));
    line(&mut s, "online + offline s", &|v| num(v, "total_s"));
    line(&mut s, "encoder online+offline s", &|v| {
        num(v, "encoder_total_s")
    });
    line(&mut s, "dealer MiB", &|v| {
        mib(v["dealer_bytes"].as_u64().unwrap_or(0))
    });
    line(&mut s, "modelled LAN s", &|v| num(v, "lan_s"));
    line(&mut s, "modelled WAN s", &|v| num(v, "wan_s"));
    if let Some((_, t)) = runs.iter().find(|(n, _)| n == "teacher") {
        for (name, key) in [
            ("speedup online", "wall_s"),
            ("speedup online+offline", "total_s"),
            ("speedup LAN", "lan_s"),
            ("speedup WAN", "wan_s"),
        ] {
            line(&mut s, name, &|v| num(t, key) / num(v, key).max(1e-12));
        }
    }
    s
}

fn bench(a: BenchArgs) -> Result<()> {
    let variants: Vec<Option<String>> = if a.variants.is_empty() {
        vec![None]
    } else {
        a.variants
            .iter()
            .map(|v| {
                parse_variant(v)?;
                Ok(Some(v.trim().to_ascii_lowercase()))
            })
            .collect::<Result<_>>()?
    };
    if a.seq.is_empty() || a.batch == 0 {
        bail!("give at least one --seq and --batch ≥ 1");
    }
    let mut runs = Vec::new();
    for &seq in &a.seq {
        let row = variants
            .iter()
            .map(|variant| bench_one(&a, seq, variant.as_deref()))
            .collect::<Result<Vec<_>>>()?;
        println!();
        print!("{}", bench_table(seq, &row));
        println!();
        runs.extend(row);
    }
    if a.output.is_none() {
        return Ok(());
    }
    // A single run keeps the single-run layout; several runs are listed with the speedups.
    let out = if runs.len() == 1 {
        runs.pop().expect("one run").1
    } else {
        json!({
            "shape": a.shape,
            "batch": a.batch,
            "runs": runs.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
            "speedup_over_teacher": speedups_over_teacher(&a.seq, &runs),
        })
    };
    write_json(&a.output, &out)
}

/// One benchmark run: `variant` (the export's own approximations when none) on a random batch
/// of `a.batch` × `seq` tokens, through both parties and the dealer.
fn bench_one(a: &BenchArgs, seq: usize, variant: Option<&str>) -> Result<(String, Value)> {
    let (mut cfg, _) = load_spec(&a.shape, false, variant, a.exp_iters)?;
    cfg.truncation = Truncation::parse(&a.truncation)?;
    let m = &cfg.model;
    if seq == 0 || seq > m.max_position_embeddings {
        bail!("--seq must be 1..={}", m.max_position_embeddings);
    }
    let hb = random_batch(a.batch, seq, m.vocab_size);
    let name = variant.map(str::to_string).unwrap_or_else(|| {
        let l = m.approx.layer(0);
        format!("{}+{}", l.act, l.attn)
    });
    println!(
        "mpc bench: {} ({} layers, hidden {}, {} heads, FFN {}), {name}, batch {}, seq {seq}, f = {}, ring matmul kernel {}, {} threads per party",
        a.shape,
        m.num_hidden_layers,
        m.hidden_size,
        m.num_attention_heads,
        m.intermediate_size,
        a.batch,
        cfg.frac_bits,
        matmul_kernel_name(),
        rayon::current_num_threads()
    );
    let mut extra = Vec::new();
    if let Some(v) = variant {
        extra.extend(["--variant".to_string(), v.to_string()]);
    }
    if let Some(n) = a.exp_iters {
        extra.extend(["--exp-iters".to_string(), n.to_string()]);
    }
    if a.no_offline {
        extra.push("--no-offline".to_string());
    }
    extra.extend(["--truncation".to_string(), a.truncation.clone()]);
    let l = launch(
        &a.shape,
        &[hb],
        Duration::from_secs(a.timeout_s),
        &extra,
        a.insecure_plaintext,
    )?;
    let mut v = summary_json(&l);
    v["shape"] = json!(a.shape);
    v["variant"] = json!(name);
    v["seq"] = json!(seq);
    v["batch"] = json!(a.batch);
    v["offline_phase"] = json!(!a.no_offline);
    v["plans"] = serde_json::to_value(&cfg)?;
    print_summary(&l, &v);
    Ok((name, v))
}

/// Uniformly random token ids (fresh each run: timings must not depend on the text), no padding.
fn random_batch(batch: usize, seq: usize, vocab: usize) -> HostBatch {
    use rand_core::RngCore;
    let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_os_rng();
    let n = batch * seq;
    HostBatch {
        input_ids: (0..n)
            .map(|_| (rng.next_u64() % vocab as u64) as i64)
            .collect(),
        attention_mask: vec![1; n],
        token_type_ids: vec![0; n],
        batch,
        seq,
    }
}

/// Each variant's speed-up over the `teacher` run at the same length (online, online + offline,
/// modelled LAN and WAN).
fn speedups_over_teacher(seqs: &[usize], runs: &[(String, Value)]) -> Vec<Value> {
    let mut speedups = Vec::new();
    for &seq in seqs {
        let at = |n: &str| runs.iter().find(|(v, r)| v == n && r["seq"] == json!(seq));
        let Some((_, t)) = at("teacher") else {
            continue;
        };
        for (name, v) in runs.iter().filter(|(_, r)| r["seq"] == json!(seq)) {
            let ratio = |k: &str| t[k].as_f64().unwrap_or(0.0) / v[k].as_f64().unwrap_or(1.0);
            speedups.push(json!({
                "variant": name, "seq": seq,
                "online": ratio("wall_s"), "online_offline": ratio("total_s"),
                "lan": ratio("lan_s"), "wan": ratio("wan_s"),
            }));
        }
    }
    speedups
}

fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |b, (j, v)| if *v > row[b] { j } else { b })
}

/// The examples `mpc run` sends through MPC, with what plaintext makes of them.
struct PlainRun {
    batches: Vec<HostBatch>,
    /// Plaintext logits, per example in batch order.
    logits: Vec<f64>,
    /// Gold labels, per example in batch order (none from a batch file).
    gold: Vec<Option<Label>>,
    /// Model class → dataset class.
    label_map: Vec<usize>,
    regression: bool,
}

impl PlainRun {
    /// The batches of a saved batch file (`--batch`), run through the model in plaintext.
    fn from_batch_file(
        model: &str,
        path: &Path,
        cfg: &crate::model::ModelConfig,
        device: &burn::prelude::Device,
    ) -> Result<Self> {
        let pre = crate::model::load_pretrained(
            model,
            &Overrides {
                no_dropout: true,
                ..Overrides::default()
            },
            device,
        )?;
        let mut run = Self {
            batches: Vec::new(),
            logits: Vec::new(),
            gold: Vec::new(),
            label_map: (0..cfg.num_labels).collect(),
            regression: cfg.is_regression(),
        };
        for hb in read_inputs(path)? {
            let logits = pre.model.logits(&hb.to_inputs(device));
            run.logits.extend(HostTensor::from_float(logits).to_f64());
            run.gold.extend(std::iter::repeat_n(None, hb.batch));
            run.batches.push(hb);
        }
        Ok(run)
    }

    /// A task's split (`--task`, `--split`, `--limit`), batched by length as `eval` does.
    fn from_task(a: &RunArgs, model: &str, device: &burn::prelude::Device) -> Result<Self> {
        let task_name = a.task.as_deref().context("give --task (or --batch)")?;
        let task = Task::find(task_name).map_err(anyhow::Error::msg)?;
        let setup = crate::eval::Setup {
            model: model.to_string(),
            overrides: Overrides::default(),
            allow_random_head: false,
            batch_size: a.batch_size,
            max_len: None,
            data: a.data.clone(),
            sample: None,
            fields: Fields::default(),
            device: device.clone(),
        };
        let tm = crate::eval::load_for_task(&setup, task)?;
        let split = *task
            .resolve_splits(&a.split)
            .map_err(anyhow::Error::msg)?
            .first()
            .context("no split")?;
        let mut set = data::load(task, a.data.as_deref(), split, &Fields::default())?;
        if let Some(n) = a.limit {
            set.examples.truncate(n);
        }
        let tok = Tokenized::new(&set, &tm.tokenizer).map_err(anyhow::Error::msg)?;
        let mut run = Self {
            batches: Vec::new(),
            logits: Vec::new(),
            gold: Vec::new(),
            label_map: tm.label_map.clone(),
            regression: task.is_regression(),
        };
        for idx in tok.plan(a.batch_size.max(1), Order::ByLength, false) {
            let b = tok.batch(&idx);
            let logits = tm.model.logits(&b.inputs.to_inputs(device));
            run.logits.extend(HostTensor::from_float(logits).to_f64());
            run.gold.extend(idx.iter().map(|&i| tok.labels[i]));
            run.batches.push(b.inputs);
        }
        Ok(run)
    }
}

/// How a classifier's answers under MPC compare with plaintext's and with the gold labels.
struct ClassQuality {
    agree: usize,
    correct_mpc: usize,
    correct_plain: usize,
    labelled: usize,
}

impl ClassQuality {
    fn of(mpc: &[f64], plain: &PlainRun, k: usize) -> Self {
        let mut q = Self {
            agree: 0,
            correct_mpc: 0,
            correct_plain: 0,
            labelled: 0,
        };
        let map = |j: usize| plain.label_map.get(j).copied().unwrap_or(j);
        for (i, gold) in plain.gold.iter().enumerate() {
            let am = argmax(&mpc[i * k..(i + 1) * k]);
            let ap = argmax(&plain.logits[i * k..(i + 1) * k]);
            q.agree += usize::from(am == ap);
            if let Some(Label::Class(g)) = *gold {
                q.labelled += 1;
                q.correct_mpc += usize::from(map(am) == g);
                q.correct_plain += usize::from(map(ap) == g);
            }
        }
        q
    }
}

fn run(a: RunArgs) -> Result<()> {
    let model_s = a.model.to_string_lossy().to_string();
    let (cfg, _) = load_spec(&model_s, false, None, a.exp_iters)?;
    let device = burn::prelude::Device::flex();
    let k = cfg.model.num_labels;
    let plain = match &a.batch {
        Some(path) => PlainRun::from_batch_file(&model_s, path, &cfg.model, &device)?,
        None => PlainRun::from_task(&a, &model_s, &device)?,
    };
    let n = plain.gold.len();
    if n == 0 {
        bail!("no examples to run");
    }
    println!(
        "mpc run: {} examples in {} batches, model {} (f = {}, ranges from {})",
        n,
        plain.batches.len(),
        a.model.display(),
        cfg.frac_bits,
        cfg.ranges_from
    );
    let extra: Vec<String> = a
        .exp_iters
        .map(|n| vec!["--exp-iters".to_string(), n.to_string()])
        .unwrap_or_default();
    let l = launch(
        &model_s,
        &plain.batches,
        Duration::from_secs(a.timeout_s),
        &extra,
        a.insecure_plaintext,
    )?;
    let mpc = &l.p1.logits;
    if mpc.len() != plain.logits.len() {
        bail!(
            "P1 returned {} logits, expected {}",
            mpc.len(),
            plain.logits.len()
        );
    }
    let max_diff = mpc
        .iter()
        .zip(&plain.logits)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let mut v = summary_json(&l);
    v["n"] = json!(n);
    v["max_logit_diff"] = json!(max_diff);
    v["model"] = json!(model_s);
    v["task"] = json!(a.task);
    v["plans"] = serde_json::to_value(&cfg)?;
    let frac = |x: usize, n: usize| (n > 0).then(|| x as f64 / n as f64);
    if plain.regression {
        v["accuracy"] = json!(None::<f64>);
        v["plaintext_accuracy"] = json!(None::<f64>);
        print_summary(&l, &v);
        let q = RegressionQuality::of(mpc, &plain.logits, &plain.gold);
        v["agreement"] = json!(q.agreement);
        v["pearson_and_spearman"] = json!(q.mpc);
        v["plaintext_pearson_and_spearman"] = json!(q.plaintext);
        println!(
            "n = {n}: Pearson with plaintext {}, pearson_and_spearman under MPC {} (plaintext {}), max |score diff| {:.4}",
            v["agreement"],
            v["pearson_and_spearman"],
            v["plaintext_pearson_and_spearman"],
            max_diff
        );
    } else {
        let q = ClassQuality::of(mpc, &plain, k);
        v["accuracy"] = json!(frac(q.correct_mpc, q.labelled));
        v["plaintext_accuracy"] = json!(frac(q.correct_plain, q.labelled));
        v["agreement"] = json!(frac(q.agree, n));
        print_summary(&l, &v);
        println!(
            "n = {n}: agreement with plaintext {}, accuracy under MPC {} (plaintext {}), max |logit diff| {:.4}",
            v["agreement"], v["accuracy"], v["plaintext_accuracy"], max_diff
        );
    }
    write_json(&a.output, &v)
}

/// A regression model under MPC, as `mpcformer report` judges a regression student: agreement
/// is the Pearson correlation of MPC's scores with plaintext's, and each is scored against the
/// gold scores with the task's metric, (Pearson + Spearman) / 2. `None` with fewer than two
/// examples (or gold scores), where a correlation says nothing.
#[derive(Debug, PartialEq)]
struct RegressionQuality {
    agreement: Option<f64>,
    mpc: Option<f64>,
    plaintext: Option<f64>,
}

impl RegressionQuality {
    fn of(mpc: &[f64], plain: &[f64], gold: &[Option<Label>]) -> Self {
        use crate::metric::{pearson, spearman};
        let both = |x: &[f64], y: &[f64]| (pearson(x, y) + spearman(x, y)) / 2.0;
        let scored: Vec<(f64, f64, f64)> = gold
            .iter()
            .zip(mpc.iter().zip(plain))
            .filter_map(|(g, (m, p))| match g {
                Some(Label::Score(g)) => Some((*g, *m, *p)),
                _ => None,
            })
            .collect();
        let g: Vec<f64> = scored.iter().map(|s| s.0).collect();
        let m: Vec<f64> = scored.iter().map(|s| s.1).collect();
        let p: Vec<f64> = scored.iter().map(|s| s.2).collect();
        let enough = |n: usize| n >= 2;
        Self {
            agreement: enough(mpc.len()).then(|| pearson(mpc, plain)),
            mpc: enough(g.len()).then(|| both(&m, &g)),
            plaintext: enough(g.len()).then(|| both(&p, &g)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_quality_by_hand() {
        let gold: Vec<Option<Label>> = [1.0, 2.0, 4.0, 3.0]
            .into_iter()
            .map(|g| Some(Label::Score(g)))
            .chain([None])
            .collect();
        // Against gold: deviations (−1.5, −0.5, 0.5, 1.5)·(−1.5, −0.5, 1.5, 0.5) = 4 over 5:
        // Pearson 0.8; one swapped pair of 4: Spearman 1 − 6·2 / (4·15) = 0.8. Plaintext
        // reversed: −0.8 both, and the fifth, unlabelled example counts only for agreement.
        let mpc = [1.0, 2.0, 3.0, 4.0, 5.0];
        let plain = [4.0, 3.0, 2.0, 1.0, 0.0];
        let q = RegressionQuality::of(&mpc, &plain, &gold);
        assert!((q.mpc.unwrap() - 0.8).abs() < 1e-12, "{q:?}");
        assert!((q.plaintext.unwrap() + 0.8).abs() < 1e-12, "{q:?}");
        assert!((q.agreement.unwrap() + 1.0).abs() < 1e-12, "{q:?}");
        let one = RegressionQuality::of(&mpc[..1], &plain[..1], &gold[..1]);
        assert_eq!(
            one,
            RegressionQuality {
                agreement: None,
                mpc: None,
                plaintext: None
            }
        );
    }
}
