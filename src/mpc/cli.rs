//! `mpcformer mpc …`: secure inference from the command line.
//!
//! - `mpc run --model <export> (--task T [--data D] [--split S] [--limit N] | --batch F)`:
//!   tokenises, runs the plaintext model for reference, then starts the dealer (a thread of
//!   this process) and the two parties (this binary re-executed as `mpc party --party 0|1`,
//!   over TCP on loopback), and reports accuracy under MPC, agreement with plaintext, max
//!   |logit difference| and per-op wall time / rounds / bytes.
//! - `mpc bench --shape bert-base|minilm|<export> --seq 128 --batch 1`: one private forward on
//!   random ids (random weights for a named shape), per-op table and LAN/WAN modelled times.
//! - `mpc party` / `mpc dealer`: one party or the dealer, e.g. on separate machines.

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
use super::dealer::{Dealer, DealerClient, DealerStats};
use super::model::{Input, MpcConfig, PartyReport, PlainWeights, ops_json, run_party};
use super::net::{LAN, NetModel, OpStats, TcpChannel, WAN};
use super::ring::matmul_kernel_name;
use crate::bench::Shape;
use crate::data::{self, Fields, Label, Order, Task, Tokenized};
use crate::io::{HostTensor, load_safetensors, save_safetensors};
use crate::model::{Act, Approx, Attn, Overrides};
use crate::tokenize::HostBatch;

#[derive(Args, Debug)]
pub struct MpcArgs {
    #[command(subcommand)]
    pub command: MpcCommand,
}

#[derive(Subcommand, Debug)]
pub enum MpcCommand {
    /// Run an exported student under 2-party MPC on a task's data or a saved batch, and compare
    /// with plaintext.
    #[command(after_help = "Examples:
  mpcformer mpc run --model exports/quickstart --task sst2 --data ../shared/data/glue --limit 200
  mpcformer mpc run --model exports/quickstart --batch tests/fixtures/tiny-bert/batch0.safetensors --output mpc.json")]
    Run(RunArgs),
    /// One private forward pass on random inputs: per-op wall time, rounds, bytes; LAN/WAN
    /// modelled times.
    #[command(after_help = "Examples:
  mpcformer mpc bench --shape bert-base --seq 128 --batch 1 --output mpc-bench.json
  mpcformer mpc bench --shape exports/quickstart --seq 64")]
    Bench(BenchArgs),
    /// One party (P0 holds the model, P1 the inputs), e.g. on its own machine.
    #[command(after_help = "Example (three machines):
  mpcformer mpc dealer --listen 0.0.0.0:7001
  mpcformer mpc party --party 0 --model exports/quickstart --listen 0.0.0.0:7000 --dealer D:7001
  mpcformer mpc party --party 1 --model exports/quickstart --peer P0:7000 --dealer D:7001 \\
      --inputs batch.safetensors --report p1.json")]
    Party(PartyArgs),
    /// The dealer: hands out seeds and P1's shares of the products.
    Dealer(DealerArgs),
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
    /// Write the report as JSON.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// `bert-base`, `minilm` (random weights, default ranges) or an export directory.
    #[arg(long, default_value = "bert-base")]
    pub shape: String,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PartyArgs {
    /// 0 (holds the model) or 1 (holds the inputs).
    #[arg(long)]
    pub party: usize,
    /// Export directory, or a shape name (`bert-base`, `minilm`: random weights).
    #[arg(long)]
    pub model: String,
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
}

#[derive(Args, Debug)]
pub struct DealerArgs {
    #[arg(long)]
    pub listen: String,
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

pub fn main(args: MpcArgs) -> Result<()> {
    match args.command {
        MpcCommand::Run(a) => run(a),
        MpcCommand::Bench(a) => bench(a),
        MpcCommand::Party(a) => party(a),
        MpcCommand::Dealer(a) => dealer_main(a),
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

fn load_spec(spec: &str, load_weights: bool) -> Result<(MpcConfig, Option<PlainWeights>)> {
    match shape_of(spec) {
        Some(shape) => {
            let mc = shape.config(Approx::new(Act::Quad, Attn::TwoQuad));
            let w = load_weights.then(|| PlainWeights::random(&mc, 0));
            Ok((MpcConfig::new(mc, super::DEFAULT_FRAC_BITS, None)?, w))
        }
        None => {
            let dir = Path::new(spec);
            let cfg = MpcConfig::from_export(dir)
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
    let (cfg, weights) = load_spec(&a.model, p == Party::P0)?;
    let dealer_chan = TcpChannel::connect(&a.dealer, timeout)?;
    let dealer = DealerClient::connect(p, Box::new(dealer_chan))?;
    let report = match p {
        Party::P0 => {
            let listen = a.listen.as_deref().context("P0 needs --listen")?;
            let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
            println!("MPC_LISTENING {}", l.local_addr()?);
            std::io::Write::flush(&mut std::io::stdout())?;
            let chan = TcpChannel::accept(&l, timeout)?;
            run_party(p, cfg, weights.as_ref(), None, Box::new(chan), dealer)?
        }
        Party::P1 => {
            let peer = a.peer.as_deref().context("P1 needs --peer")?;
            let path = a.inputs.as_deref().context("P1 needs --inputs")?;
            let inputs: Vec<Input> = read_inputs(path)?.iter().map(Input::from_host).collect();
            let chan = TcpChannel::connect(peer, timeout)?;
            // For scripts and tests: the session with P0 has begun.
            println!("MPC_CONNECTED");
            std::io::Write::flush(&mut std::io::stdout())?;
            run_party(p, cfg, None, Some(&inputs), Box::new(chan), dealer)?
        }
    };
    if let Some(path) = &a.report {
        crate::io::write_atomic(path, serde_json::to_string(&report)?.as_bytes())?;
    }
    Ok(())
}

/// Accepts both parties, hands out seeds, serves P1.
fn dealer_serve(l: TcpListener, timeout: Duration) -> Result<DealerStats> {
    let mut dealer = Dealer::new();
    // Each party gets its seed as soon as it connects (P0 waits for it before listening).
    let mut a = TcpChannel::accept(&l, timeout)?;
    let pa = dealer.hello(&mut a)?;
    let mut b = TcpChannel::accept(&l, timeout)?;
    let pb = dealer.hello(&mut b)?;
    if pa == pb {
        bail!("dealer: both connections claim to be the same party");
    }
    let p1 = if pa == Party::P1 { &mut a } else { &mut b };
    dealer.serve(p1)?;
    Ok(dealer.stats)
}

fn dealer_main(a: DealerArgs) -> Result<()> {
    let l = TcpListener::bind(&a.listen).with_context(|| format!("binding {}", a.listen))?;
    eprintln!("dealer listening on {}", l.local_addr()?);
    let s = dealer_serve(l, Duration::from_secs(a.timeout_s))?;
    eprintln!(
        "dealer done: {} items in {} rounds, sent {} bytes, received {} bytes",
        s.items, s.rounds, s.bytes_sent, s.bytes_recv
    );
    Ok(())
}

struct Launched {
    p0: PartyReport,
    p1: PartyReport,
    dealer: DealerStats,
    wall_s: f64,
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts the dealer (thread) and both parties (processes) on loopback.
fn launch(model: &str, inputs: &[HostBatch], timeout: Duration) -> Result<Launched> {
    let tmp = tempfile::tempdir()?;
    let inputs_path = tmp.path().join("inputs.safetensors");
    write_inputs(&inputs_path, inputs)?;
    let dl = TcpListener::bind("127.0.0.1:0")?;
    let dealer_addr = dl.local_addr()?.to_string();
    let dealer = std::thread::spawn(move || dealer_serve(dl, timeout));
    let exe = std::env::current_exe()?;
    let t = Instant::now();
    let common = |p: usize| {
        let mut c = Command::new(&exe);
        c.args(["mpc", "party", "--party", &p.to_string(), "--model", model])
            .args(["--dealer", &dealer_addr])
            .args(["--timeout-s", &timeout.as_secs().to_string()])
            .arg("--report")
            .arg(tmp.path().join(format!("p{p}.json")));
        c
    };
    let mut c0 = common(0)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting P0")?;
    let mut line = String::new();
    BufReader::new(c0.stdout.take().expect("piped")).read_line(&mut line)?;
    let Some(addr) = line
        .trim()
        .strip_prefix("MPC_LISTENING ")
        .map(str::to_string)
    else {
        kill(&mut c0);
        bail!("P0 did not start (see its error above)");
    };
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
        "matmul_kernel": matmul_kernel_name(),
        "threads": rayon::current_num_threads(),
    })
}

fn print_summary(l: &Launched, v: &Value) {
    print!("{}", op_table(l));
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

fn bench(a: BenchArgs) -> Result<()> {
    let (cfg, _) = load_spec(&a.shape, false)?;
    let m = &cfg.model;
    if a.seq == 0 || a.batch == 0 || a.seq > m.max_position_embeddings {
        bail!(
            "--seq must be 1..={} and --batch at least 1",
            m.max_position_embeddings
        );
    }
    use rand_core::RngCore;
    let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_os_rng();
    let n = a.batch * a.seq;
    let ids: Vec<i64> = (0..n)
        .map(|_| (rng.next_u64() % m.vocab_size as u64) as i64)
        .collect();
    let hb = HostBatch {
        input_ids: ids,
        attention_mask: vec![1; n],
        token_type_ids: vec![0; n],
        batch: a.batch,
        seq: a.seq,
    };
    println!(
        "mpc bench: {} ({} layers, hidden {}, {} heads, FFN {}), batch {}, seq {}, f = {}, ring matmul kernel {}, {} threads per party",
        a.shape,
        m.num_hidden_layers,
        m.hidden_size,
        m.num_attention_heads,
        m.intermediate_size,
        a.batch,
        a.seq,
        cfg.frac_bits,
        matmul_kernel_name(),
        rayon::current_num_threads()
    );
    let l = launch(&a.shape, &[hb], Duration::from_secs(a.timeout_s))?;
    let mut v = summary_json(&l);
    v["shape"] = json!(a.shape);
    v["seq"] = json!(a.seq);
    v["batch"] = json!(a.batch);
    v["plans"] = serde_json::to_value(&cfg)?;
    print_summary(&l, &v);
    write_json(&a.output, &v)
}

fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |b, (j, v)| if *v > row[b] { j } else { b })
}

fn run(a: RunArgs) -> Result<()> {
    let model_s = a.model.to_string_lossy().to_string();
    let (cfg, _) = load_spec(&model_s, false)?;
    let device = burn::prelude::Device::flex();
    let k = cfg.model.num_labels;
    // Batches, plaintext logits, gold labels (per example, in batch order).
    let mut batches: Vec<HostBatch> = Vec::new();
    let mut plain: Vec<f64> = Vec::new();
    let mut gold: Vec<Option<Label>> = Vec::new();
    let mut label_map: Vec<usize> = (0..k).collect();
    let mut regression = cfg.model.is_regression();
    if let Some(path) = &a.batch {
        let pre = crate::model::load_pretrained(
            &model_s,
            &Overrides {
                no_dropout: true,
                ..Overrides::default()
            },
            &device,
        )?;
        for hb in read_inputs(path)? {
            let logits = pre.model.logits(&hb.to_inputs(&device));
            plain.extend(HostTensor::from_float(logits).to_f64());
            gold.extend(std::iter::repeat_n(None, hb.batch));
            batches.push(hb);
        }
    } else {
        let task_name = a.task.as_deref().context("give --task (or --batch)")?;
        let task = Task::find(task_name).map_err(anyhow::Error::msg)?;
        regression = task.is_regression();
        let setup = crate::eval::Setup {
            model: model_s.clone(),
            overrides: Overrides::default(),
            allow_random_head: false,
            batch_size: a.batch_size,
            max_len: None,
            data: a.data.clone(),
            fields: Fields::default(),
            device: device.clone(),
        };
        let tm = crate::eval::load_for_task(&setup, task)?;
        label_map = tm.label_map.clone();
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
        for idx in tok.plan(a.batch_size.max(1), Order::ByLength, false) {
            let b = tok.batch(&idx);
            let logits = tm.model.logits(&b.inputs.to_inputs(&device));
            plain.extend(HostTensor::from_float(logits).to_f64());
            gold.extend(idx.iter().map(|&i| tok.labels[i]));
            batches.push(b.inputs);
        }
    }
    let n = gold.len();
    if n == 0 {
        bail!("no examples to run");
    }
    println!(
        "mpc run: {} examples in {} batches, model {} (f = {}, ranges from {})",
        n,
        batches.len(),
        a.model.display(),
        cfg.frac_bits,
        cfg.ranges_from
    );
    let l = launch(&model_s, &batches, Duration::from_secs(a.timeout_s))?;
    let mpc = &l.p1.logits;
    if mpc.len() != plain.len() {
        bail!("P1 returned {} logits, expected {}", mpc.len(), plain.len());
    }
    let max_diff = mpc
        .iter()
        .zip(&plain)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let (mut agree, mut correct_mpc, mut correct_plain, mut labelled) = (0, 0, 0, 0);
    for i in 0..n {
        let (rm, rp) = (&mpc[i * k..(i + 1) * k], &plain[i * k..(i + 1) * k]);
        let (am, ap) = (argmax(rm), argmax(rp));
        agree += usize::from(am == ap);
        if let Some(Label::Class(g)) = gold[i] {
            labelled += 1;
            let map = |j: usize| label_map.get(j).copied().unwrap_or(j);
            correct_mpc += usize::from(map(am) == g);
            correct_plain += usize::from(map(ap) == g);
        }
    }
    let mut v = summary_json(&l);
    let frac = |x: usize, n: usize| (n > 0).then(|| x as f64 / n as f64);
    v["n"] = json!(n);
    v["accuracy"] = json!(if regression {
        None
    } else {
        frac(correct_mpc, labelled)
    });
    v["plaintext_accuracy"] = json!(if regression {
        None
    } else {
        frac(correct_plain, labelled)
    });
    v["agreement"] = json!(if regression { None } else { frac(agree, n) });
    v["max_logit_diff"] = json!(max_diff);
    v["model"] = json!(model_s);
    v["task"] = json!(a.task);
    v["plans"] = serde_json::to_value(&cfg)?;
    print_summary(&l, &v);
    println!(
        "n = {n}: agreement with plaintext {}, accuracy under MPC {} (plaintext {}), max |logit diff| {:.4}",
        v["agreement"], v["accuracy"], v["plaintext_accuracy"], max_diff
    );
    write_json(&a.output, &v)
}
