//! The `mpcformer` command line: thin — parses, then calls the library.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use mpcformer::bench;
use mpcformer::data::{Fields, Task};
use mpcformer::device::Backend;
use mpcformer::eval;
use mpcformer::export;
use mpcformer::io::{HostTensor, batch_from_safetensors, save_safetensors};
use mpcformer::model::{self, Act, Approx, Attn, Capture, ClassifierOutput, Inputs, Overrides};
use mpcformer::tokenize::{Encoded, HostBatch, TextTokenizer};
use mpcformer::train::recipe::Recipe;
use mpcformer::train::run;

/// `--version` adds the backends compiled in, so a copied binary can be told apart.
const LONG_VERSION: &str = long_version();

const fn long_version() -> &'static str {
    // `concat!` takes literals only, so the four feature sets are spelled out.
    if cfg!(all(feature = "wgpu", feature = "cuda")) {
        concat!(env!("CARGO_PKG_VERSION"), " (backends: flex, wgpu, cuda)")
    } else if cfg!(feature = "wgpu") {
        concat!(env!("CARGO_PKG_VERSION"), " (backends: flex, wgpu)")
    } else if cfg!(feature = "cuda") {
        concat!(env!("CARGO_PKG_VERSION"), " (backends: flex, cuda)")
    } else {
        concat!(env!("CARGO_PKG_VERSION"), " (backends: flex)")
    }
}

#[derive(Parser)]
#[command(
    name = "mpcformer",
    version,
    long_version = LONG_VERSION,
    about = "MPC-friendly BERT/RoBERTa: Quad/2Quad/2ReLU approximations, distillation, export, 2-party inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a model on text or a saved batch; print tokens, ids and logits; dump every
    /// intermediate tensor.
    #[command(after_help = "Examples:
  mpcformer inspect --model ../shared/models/all-MiniLM-L6-v2 --text \"Hello world\"
  mpcformer inspect --model ../shared/models/all-MiniLM-L6-v2 --act quad --attn 2quad \\
      --text \"A man is playing a guitar.\" --text-pair \"Someone plays an instrument.\"
  mpcformer inspect --model bert-base-uncased --text \"first\" --text \"second one\" --dump out.safetensors
  mpcformer inspect --model ../shared/fixtures/tiny-bert/model --batch batch0.safetensors --dump ours.safetensors")]
    Inspect(InspectArgs),
    /// Time training, distillation or inference steps on random data of fixed shapes.
    #[command(after_help = "Examples:
  mpcformer bench infer --shape minilm --batch 16 --seq 128
  mpcformer bench distill --shape minilm --steps 5 --output distill.json
  mpcformer bench train --shape bert-base --batch 32 --seq 128 --steps 3")]
    Bench(BenchArgs),
    /// Evaluate a checkpoint on GLUE/IMDb splits with the official metrics; print a table.
    #[command(after_help = "Examples:
  mpcformer eval --model checkpoints/rte --task rte --data ../shared/data/glue
  mpcformer eval --model ../shared/models/all-MiniLM-L6-v2 --task rte --data ../shared/data/glue \\
      --allow-random-head --output rte.json
  mpcformer eval --model 'checkpoints/{task}' --task rte --task mrpc --task stsb --data hub:nyu-mll/glue
  mpcformer eval --model checkpoints/imdb --task imdb --data ../shared/data/imdb --batch-size 8
  mpcformer eval --model m --task sst2 --data reviews.csv --text-field review --label-field stars")]
    Eval(EvalArgs),
    /// Compare a student with its teacher on a split: both scores, their agreement, and per
    /// layer the hidden-state MSE, attention-score MSE and attention KL, i.e. where the student
    /// loses its teacher.
    #[command(after_help = "Examples:
  mpcformer compare --teacher checkpoints/minilm-rte-quad+2quad-fitted-s42/teacher \\
      --model checkpoints/minilm-rte-quad+2quad-fitted-s42/student --task rte --data ../shared/data/glue
  mpcformer compare --teacher 'checkpoints/{task}/teacher' --model 'checkpoints/{task}/student' \\
      --task rte --task mrpc --data ../shared/data/glue --output gap.json")]
    Compare(CompareArgs),
    /// Write GLUE submission files (`<Task>.tsv`: index, prediction) for test splits.
    #[command(after_help = "Examples:
  mpcformer predict --model 'checkpoints/{task}' --task rte --task mnli --data glue_data --output-dir submission")]
    Predict(PredictArgs),
    /// Run a whole recipe: teacher fine-tuning, distillation stages, evaluation, summary.
    #[command(after_help = "Examples:
  mpcformer run recipes/quickstart.toml
  mpcformer run recipes/minilm.toml --set data.task=mrpc --set seed=1
  mpcformer run recipes/bert-base.toml --set data.task=rte --set student.attn=2relu
  mpcformer run recipes/minilm.toml --set data.task=rte --resume")]
    Run(RunArgs),
    /// Fine-tune a teacher on a task's labels (a recipe with the single stage `finetune`).
    #[command(after_help = "Example:
  mpcformer finetune --model ../shared/models/all-MiniLM-L6-v2 --task rte --data ../shared/data/glue --set finetune.epochs=2")]
    Finetune(StageArgs),
    /// Distil an MPC-friendly student from a fine-tuned teacher (stages 1 and 2).
    #[command(after_help = "Example:
  mpcformer distill --model checkpoints/rte-teacher/teacher --task rte --data ../shared/data/glue --act quad --attn 2quad")]
    Distill(StageArgs),
    /// Markdown tables (per task, mean ± std over seeds, retention) and SVG plots from run
    /// directories.
    #[command(after_help = "Examples:
  mpcformer report checkpoints/minilm-rte-quad+2quad-s42 checkpoints/minilm-rte-quad+2quad-s1
  mpcformer report results/ --output RESULTS-tables.md --plots results/plots
  mpcformer report results/ --update RESULTS.md --plots results/plots   # between its markers
  mpcformer report checkpoints/ --save-runs results/    # keep the metrics (no weights) in the repo")]
    Report(ReportArgs),
    /// Write an MPC-ready export: HF-named weights (model.safetensors and pytorch_model.bin),
    /// config.json with the approximations' exact formulas, tokenizer, and mpc_manifest.json
    /// (task, provenance, fixed-point encoding, value ranges on dev data, sha256 of every file).
    #[command(after_help = "Examples:
  mpcformer export --run checkpoints/quickstart --out exports/quickstart
  mpcformer export --run checkpoints/quickstart --out exports/quickstart-f16 --dtype f16
  mpcformer export --model checkpoints/rte-distill/student --task rte --data ../shared/data/glue \\
      --out exports/rte --fixed-point-bits 20
  mpcformer export --model my-model --act quad --attn 2quad --layer 0:gelu:softmax \\
      --tokenizer my-vocab --out exports/mine --no-data")]
    Export(ExportArgs),
    /// Validate an export: sha256 of every file, tensor names and shapes against config.json,
    /// config and manifest consistency, tokenizer.
    #[command(after_help = "Example:
  mpcformer load-check exports/quickstart")]
    LoadCheck(LoadCheckArgs),
    /// Secure 2-party inference of an exported student (run, bench, party, dealer).
    Mpc(mpcformer::mpc::cli::MpcArgs),
}

/// Approximation flags, the same wherever a model is loaded.
#[derive(Args, Clone, Debug)]
struct ApproxArgs {
    /// FFN activation for every layer: gelu, gelu_tanh, relu, quad (default: the checkpoint's).
    #[arg(long)]
    act: Option<Act>,
    /// Attention normalisation for every layer: softmax, 2quad, 2relu (default: the checkpoint's).
    #[arg(long)]
    attn: Option<Attn>,
    /// Per-layer override `N:act[:attn]`, e.g. `--layer 0:gelu:softmax` (repeatable).
    #[arg(long = "layer", value_parser = Approx::parse_override)]
    layers: Vec<(usize, model::LayerOverride)>,
}

impl ApproxArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            act: self.act,
            attn: self.attn,
            layers: self.layers.clone(),
            ..Overrides::default()
        }
    }
}

#[derive(Args)]
struct InspectArgs {
    /// Model directory (config.json + model.safetensors + tokenizer) or Hub id
    /// (`bert-base-uncased`, `org/name`).
    #[arg(long)]
    model: String,
    /// Input sentence; repeat for a batch (right-padded to the longest).
    #[arg(long, conflicts_with = "batch")]
    text: Vec<String>,
    /// Second sentence of a pair, one per --text.
    #[arg(long)]
    text_pair: Vec<String>,
    /// A saved batch (`input_ids`, `attention_mask`, optional `token_type_ids`) instead of text.
    #[arg(long)]
    batch: Option<PathBuf>,
    #[command(flatten)]
    approx: ApproxArgs,
    /// Truncate inputs to this many tokens (longest-first for pairs).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Write inputs and every intermediate tensor here, under the fixtures' names.
    #[arg(long)]
    dump: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    device: Backend,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(value_enum)]
    case: bench::Case,
    #[arg(long, value_enum, default_value_t = bench::Shape::Minilm)]
    shape: bench::Shape,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed steps (after warm-up).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Dropout probability of the trained model (HF's default 0.1; bench_torch.py trains with it).
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// Write the result as JSON here.
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    device: Backend,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Inspect(a) => inspect(a),
        Command::Eval(a) => eval(a),
        Command::Compare(a) => compare(a),
        Command::Predict(a) => predict(a),
        Command::Run(a) => {
            let recipe = Recipe::load(&a.recipe, &a.set)?;
            print_summary(&run::run(&recipe, a.resume)?);
            Ok(())
        }
        Command::Finetune(a) => stage_command(a, "finetune"),
        Command::Distill(a) => stage_command(a, "distill"),
        Command::Report(a) => {
            let runs = mpcformer::report::find_runs(&a.runs)?;
            if let Some(dest) = &a.save_runs {
                mpcformer::report::save_runs(&runs, dest)?;
                eprintln!(
                    "copied the metrics of {} runs to {}",
                    runs.len(),
                    dest.display()
                );
            }
            let md = mpcformer::report::markdown(&runs);
            match (&a.output, &a.update) {
                (Some(p), _) => mpcformer::io::write_atomic(p, md.as_bytes())?,
                (None, Some(p)) => {
                    let doc = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let doc = mpcformer::report::splice(&doc, &md)
                        .with_context(|| format!("updating {}", p.display()))?;
                    mpcformer::io::write_atomic(p, doc.as_bytes())?;
                    eprintln!("updated the tables in {}", p.display());
                }
                (None, None) => print!("{md}"),
            }
            if let Some(dir) = &a.plots {
                let files = mpcformer::report::plots(&runs, dir)?;
                eprintln!("wrote {} plots to {}", files.len(), dir.display());
            }
            Ok(())
        }
        Command::Export(a) => export(a),
        Command::LoadCheck(a) => load_check(a),
        Command::Mpc(a) => mpcformer::mpc::cli::main(a),
        Command::Bench(a) => {
            let device = a.device.device()?;
            let spec = bench::BenchSpec {
                case: a.case,
                shape: a.shape,
                batch: a.batch,
                seq: a.seq,
                warmup: a.warmup,
                steps: a.steps,
                dropout: a.dropout,
            };
            let r = bench::run(&spec, &device)?;
            let json = serde_json::to_string_pretty(&r)?;
            println!("{json}");
            if let Some(out) = a.output {
                mpcformer::io::write_atomic(&out, json.as_bytes())?;
            }
            Ok(())
        }
    }
}

fn inspect(a: InspectArgs) -> Result<()> {
    let device = a.device.device()?;
    let overrides = Overrides {
        no_dropout: true,
        ..a.approx.overrides()
    };
    let pre = model::load_pretrained(&a.model, &overrides, &device)?;
    eprintln!("{}: {}", pre.dir.display(), pre.report);
    let cfg = &pre.model.config;
    eprintln!(
        "{:?}, {} layers, hidden {}, approximations {}",
        cfg.arch,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.approx.label()
    );
    let inputs = match &a.batch {
        Some(path) => batch_from_safetensors(path, &device)?,
        None => encode_texts(&a, &pre.dir, &device)?,
    };
    let capture = if a.dump.is_some() {
        Capture::ALL
    } else {
        Capture::NONE
    };
    let out = pre.model.forward(&inputs, capture);
    let logits = HostTensor::from_float(out.logits.clone());
    let head_is_random = !pre.report.initialised.is_empty();
    let [b, s, d] = out.encoder.last_hidden_state.dims();
    let mask = inputs.attention_mask.clone().float().reshape([b, s, 1]);
    let mean = (out.encoder.last_hidden_state.clone() * mask.clone()).sum_dim(1) / mask.sum_dim(1);
    let mean = HostTensor::from_float(mean.reshape([b, d])).to_f64();
    let k = logits.shape()[1];
    let lv = logits.to_f64();
    for i in 0..b {
        let row = &lv[i * k..(i + 1) * k];
        let emb = &mean[i * d..i * d + d.min(6)];
        println!(
            "[{i}] logits: {}{}",
            fmt_row(row),
            if head_is_random {
                "  (head randomly initialised: not in the checkpoint)"
            } else {
                ""
            }
        );
        println!(
            "[{i}] mean-pooled embedding[..{}]: {}",
            d.min(6),
            fmt_row(emb)
        );
    }
    if let Some(path) = &a.dump {
        dump_intermediates(path, &inputs, out, logits)?;
    }
    Ok(())
}

/// `--text` (and `--text-pair`) tokenised with the model's tokenizer, each example's tokens and
/// ids printed, collated into one batch.
fn encode_texts(a: &InspectArgs, dir: &Path, device: &burn::prelude::Device) -> Result<Inputs> {
    if a.text.is_empty() {
        bail!("give --text (repeatable) or --batch");
    }
    if !a.text_pair.is_empty() && a.text_pair.len() != a.text.len() {
        bail!(
            "{} --text-pair values for {} --text values; give one pair per text",
            a.text_pair.len(),
            a.text.len()
        );
    }
    let tok = TextTokenizer::from_dir(dir, a.max_len)?;
    let encs: Vec<Encoded> = a
        .text
        .iter()
        .enumerate()
        .map(|(i, t)| tok.encode(t, a.text_pair.get(i).map(String::as_str)))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    for (i, e) in encs.iter().enumerate() {
        println!("[{i}] tokens: {}", e.tokens.join(" "));
        println!("[{i}] ids:    {:?}", e.ids);
    }
    let refs: Vec<&Encoded> = encs.iter().collect();
    Ok(HostBatch::collate(&refs, tok.pad_id).to_inputs(device))
}

/// `--dump`: the inputs and every intermediate tensor, named as the PyTorch fixtures name them.
fn dump_intermediates(
    path: &Path,
    inputs: &Inputs,
    out: ClassifierOutput,
    logits: HostTensor,
) -> Result<()> {
    let mut map = BTreeMap::new();
    map.insert(
        "input_ids".into(),
        HostTensor::from_int(inputs.input_ids.clone()),
    );
    map.insert(
        "attention_mask".into(),
        HostTensor::from_int(inputs.attention_mask.clone()),
    );
    if let Some(tt) = &inputs.token_type_ids {
        map.insert("token_type_ids".into(), HostTensor::from_int(tt.clone()));
    }
    for (i, h) in out.encoder.hidden_states.into_iter().enumerate() {
        map.insert(format!("hidden_states.{i}"), HostTensor::from_float(h));
    }
    for (i, t) in out.encoder.attention_scores.into_iter().enumerate() {
        map.insert(format!("attention_scores.{i}"), HostTensor::from_float(t));
    }
    for (i, t) in out.encoder.attentions.into_iter().enumerate() {
        map.insert(format!("attentions.{i}"), HostTensor::from_float(t));
    }
    map.insert(
        "pooled_output".into(),
        HostTensor::from_float(out.pooled_output),
    );
    map.insert("logits".into(), logits);
    save_safetensors(path, &map, None).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {} tensors to {}", map.len(), path.display());
    Ok(())
}

fn fmt_row(v: &[f64]) -> String {
    let parts: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
    format!("[{}]", parts.join(", "))
}

/// Which tasks, where their data is, and which fields to read (`eval`, `predict`).
#[derive(Args)]
struct DataArgs {
    /// Task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, imdb (repeatable).
    #[arg(long = "task", required = true, value_parser = parse_task)]
    tasks: Vec<&'static Task>,
    /// Data: a GLUE folder or file (.tsv), an aclImdb folder, .jsonl/.csv/.parquet, or
    /// `hub:org/name[/config]` (default: the task's Hub dataset, e.g. hub:nyu-mll/glue/rte).
    #[arg(long)]
    data: Option<String>,
    /// Text field(s) of JSONL/CSV/parquet/TSV files (two for a pair; default: the Hub's names).
    #[arg(long = "text-field", alias = "text-fields", value_delimiter = ',')]
    text_fields: Vec<String>,
    /// Label field of JSONL/CSV/parquet/TSV files (default `label`).
    #[arg(long)]
    label_field: Option<String>,
    /// Use N examples of each split, drawn uniformly as a recipe's `data.eval_sample` draws them
    /// (the same draw for every model and seed), e.g. the 1,000 IMDb test reviews a run scores.
    #[arg(long, value_name = "N")]
    sample: Option<usize>,
}

fn parse_task(s: &str) -> Result<&'static Task, String> {
    Task::find(s)
}

/// The checkpoint and how to run it (`eval`, `predict`).
#[derive(Args)]
struct CheckpointArgs {
    /// Model directory or Hub id; `{task}` is replaced by the task name (e.g. 'checkpoints/{task}').
    #[arg(long)]
    model: String,
    #[command(flatten)]
    approx: ApproxArgs,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Maximum tokens per example (default: the task's, 128; IMDb 512).
    #[arg(long)]
    max_len: Option<usize>,
    /// Run even if the checkpoint has no classification head for the task (random predictions).
    #[arg(long)]
    allow_random_head: bool,
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    device: Backend,
}

impl CheckpointArgs {
    fn setup(&self, data: &DataArgs) -> Result<eval::Setup> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        Ok(eval::Setup {
            model: self.model.clone(),
            overrides: self.approx.overrides(),
            allow_random_head: self.allow_random_head,
            batch_size: self.batch_size,
            max_len: self.max_len,
            data: data.data.clone(),
            sample: data.sample,
            fields: Fields {
                text: data.text_fields.clone(),
                label: data.label_field.clone(),
            },
            device: self.device.device()?,
        })
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    run: CheckpointArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Split: dev (MNLI: dev_matched and dev_mismatched; IMDb: test), train, test, ...
    #[arg(long, default_value = "dev")]
    split: String,
    /// Write the results as JSON here (one object, or a list for several).
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct CompareArgs {
    /// The student (`--model`) and how to run it.
    #[command(flatten)]
    run: CheckpointArgs,
    /// The teacher: directory or Hub id, run as saved (`{task}` as in `--model`).
    #[arg(long)]
    teacher: String,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value = "dev")]
    split: String,
    /// Write the comparisons as JSON here (a list).
    #[arg(long)]
    output: Option<PathBuf>,
}

fn compare(a: CompareArgs) -> Result<()> {
    let student = a.run.setup(&a.data)?;
    let teacher = eval::Setup {
        model: a.teacher.clone(),
        overrides: Default::default(),
        ..student.clone()
    };
    let results = eval::compare_tasks(&teacher, &student, &a.data.tasks, &a.split)?;
    for c in &results {
        print!("{}", eval::format_comparison(c));
    }
    if let Some(out) = a.output {
        mpcformer::io::write_atomic(&out, serde_json::to_string_pretty(&results)?.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    run: CheckpointArgs,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value = "test")]
    split: String,
    /// Folder for the submission files.
    #[arg(long, default_value = "submission")]
    output_dir: PathBuf,
}

fn eval(a: EvalArgs) -> Result<()> {
    let setup = a.run.setup(&a.data)?;
    let results = eval::eval_tasks(&setup, &a.data.tasks, &a.split)?;
    print!("{}", eval::format_table(&results));
    if let Some(out) = a.output {
        let json = serde_json::to_string_pretty(&eval::results_json(&results))?;
        mpcformer::io::write_atomic(&out, json.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let setup = a.run.setup(&a.data)?;
    eval::predict_tasks(&setup, &a.data.tasks, &a.split, &a.output_dir)?;
    Ok(())
}

#[derive(Args)]
struct RunArgs {
    /// Recipe file (TOML).
    recipe: PathBuf,
    /// Override a recipe field, e.g. `--set stage1.epochs=3` (repeatable).
    #[arg(long)]
    set: Vec<String>,
    /// Continue an interrupted run from its last checkpoints.
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct StageArgs {
    /// Teacher checkpoint: directory or Hub id.
    #[arg(long)]
    model: String,
    #[arg(long)]
    task: String,
    /// Data spec (path or `hub:org/name[/config]`); default: the task's Hub dataset.
    #[arg(long)]
    data: Option<String>,
    /// Student FFN activation (distill).
    #[arg(long, default_value = "quad")]
    act: String,
    /// Student attention normalisation (distill).
    #[arg(long, default_value = "2quad")]
    attn: String,
    /// Run name (default: `<task>-<stage>`).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "checkpoints")]
    output_dir: PathBuf,
    /// Override any recipe field, e.g. `--set stage1.epochs=3`.
    #[arg(long)]
    set: Vec<String>,
    #[arg(long)]
    resume: bool,
}

/// `finetune` and `distill` are one-recipe shorthands: build the recipe, then run it.
fn stage_command(a: StageArgs, what: &str) -> Result<()> {
    let stages = if what == "finetune" {
        r#"["finetune"]"#
    } else {
        r#"["stage1", "stage2"]"#
    };
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{what}", a.task));
    let text = format!(
        "name = {name:?}\nstages = {stages}\noutput_dir = {:?}\n[teacher]\nmodel = {:?}\n[student]\nact = {:?}\nattn = {:?}\n[data]\ntask = {:?}\n{}",
        a.output_dir.display().to_string(),
        a.model,
        a.act,
        a.attn,
        a.task,
        a.data
            .as_ref()
            .map(|d| format!("spec = {d:?}\n"))
            .unwrap_or_default(),
    );
    let tmp = tempfile::NamedTempFile::new()?;
    std::fs::write(tmp.path(), text)?;
    let recipe = Recipe::load(tmp.path(), &a.set)?;
    print_summary(&run::run(&recipe, a.resume)?);
    Ok(())
}

fn print_summary(s: &run::Summary) {
    println!("\n{} ({}, seed {})", s.name, s.task, s.seed);
    let row = |who: &str, m: &run::ModelSummary| {
        let metrics: Vec<String> = m
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", v * 100.0))
            .collect();
        println!("  {who:<8} {:<14} {}", m.approximations, metrics.join("  "));
    };
    row("teacher", &s.teacher);
    if let Some(st) = &s.student {
        row("student", st);
    }
    if let Some(r) = s.retention {
        println!("  retention {:.1}%", r * 100.0);
    }
    for (k, v) in &s.stage_wall_s {
        println!("  {k}: {v:.0} s");
    }
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["run", "model"]))]
struct ExportArgs {
    /// A finished run directory (`checkpoints/<name>`): exports its student with the run's task,
    /// recipe, teacher and metrics.
    #[arg(long)]
    run: Option<PathBuf>,
    /// A model directory or Hub id.
    #[arg(long)]
    model: Option<String>,
    /// The export directory (replaced if it holds an earlier export).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    approx: ApproxArgs,
    /// Weight dtype of model.safetensors.
    #[arg(long, value_enum, default_value_t = export::Dtype::F32)]
    dtype: export::Dtype,
    /// Do not write pytorch_model.bin (the same tensors as model.safetensors, for MPCFormer's
    /// own loaders, which read only that).
    #[arg(long)]
    no_pytorch_bin: bool,
    /// Fractional bits of the fixed-point encoding (64-bit ring) the manifest prescribes.
    #[arg(long, default_value_t = 16)]
    fixed_point_bits: u32,
    /// Task: labels, maximum length, and dev data for value ranges (default: the run's).
    #[arg(long)]
    task: Option<String>,
    /// Data spec for the dev pass (default: the run's recipe data; for --model --task, the
    /// task's Hub dataset).
    #[arg(long)]
    data: Option<String>,
    /// Split of the dev pass (default: the run's eval split, else dev).
    #[arg(long)]
    split: Option<String>,
    /// Use at most this many examples for the dev pass.
    #[arg(long)]
    range_limit: Option<usize>,
    /// Export without a dev pass (no value ranges, no recomputed metrics).
    #[arg(long)]
    no_data: bool,
    /// Tokenizer directory or Hub id when the model directory has none.
    #[arg(long)]
    tokenizer: Option<String>,
    /// The teacher a --model came from, recorded in the manifest.
    #[arg(long)]
    teacher: Option<String>,
    /// Maximum tokens per example (default: the recipe's or the task's, capped by the model).
    #[arg(long)]
    max_len: Option<usize>,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    device: Backend,
}

#[derive(Args)]
struct LoadCheckArgs {
    /// The export directory.
    dir: PathBuf,
}

fn export(a: ExportArgs) -> Result<()> {
    let source = match (a.run, a.model) {
        (Some(r), None) => export::Source::Run(r),
        (None, Some(m)) => export::Source::Model(m),
        _ => bail!("give exactly one of --run and --model"),
    };
    let opts = export::ExportOptions {
        overrides: a.approx.overrides(),
        dtype: a.dtype,
        pytorch_bin: !a.no_pytorch_bin,
        fractional_bits: a.fixed_point_bits,
        task: a.task,
        data: a.data,
        split: a.split,
        range_limit: a.range_limit,
        no_data: a.no_data,
        tokenizer: a.tokenizer,
        teacher: a.teacher,
        max_len: a.max_len,
        batch_size: a.batch_size,
        device: a.device.device()?,
        ..export::ExportOptions::new(source, a.out)
    };
    let r = export::export(&opts)?;
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    let m = &r.manifest;
    println!(
        "exported {} ({}, {}, {:?}) to {}",
        m.approximations["label"].as_str().unwrap_or_default(),
        m.architecture,
        m.task.as_deref().unwrap_or("no task"),
        m.dtype,
        r.dir.display()
    );
    if let Some(d) = &m.dev_metrics
        && let Some(metrics) = d["metrics"].as_object()
    {
        let parts: Vec<String> = metrics
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", v.as_f64().unwrap_or(f64::NAN) * 100.0))
            .collect();
        println!(
            "  dev ({} examples): {}",
            d["examples"].as_u64().unwrap_or(0),
            parts.join("  ")
        );
    }
    if let Some(v) = &m.value_ranges {
        let s = &v["summary"];
        println!(
            "  value ranges: max square input {:.3}, min headroom {:.1} bits at {} fractional bits{}",
            s["max_square_input"].as_f64().unwrap_or(f64::NAN),
            s["min_headroom_bits"].as_f64().unwrap_or(f64::NAN),
            m.fixed_point.fractional_bits,
            if s["fits"].as_bool() == Some(true) {
                ""
            } else {
                " — DOES NOT FIT"
            }
        );
    }
    println!("  {} files, sha256 in {}", m.files.len(), export::MANIFEST);
    Ok(())
}

fn load_check(a: LoadCheckArgs) -> Result<()> {
    let r = export::load_check(&a.dir)?;
    for p in &r.passed {
        println!("ok  {p}");
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    println!("{}: OK", a.dir.display());
    Ok(())
}

#[derive(Args)]
struct ReportArgs {
    /// Run directories, or folders holding them (e.g. `checkpoints/`, `results/`).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Write the Markdown here instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Write SVG plots (loss curves, dev metric over steps, teacher vs student) to this folder.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Copy each run's summary.json, recipe.toml and metrics.jsonl (no weights) under this folder.
    #[arg(long)]
    save_runs: Option<PathBuf>,
    /// Replace the tables between the `<!-- mpcformer report: begin -->` and
    /// `<!-- mpcformer report: end -->` lines of this Markdown file; the prose around them is kept.
    #[arg(long, conflicts_with = "output")]
    update: Option<PathBuf>,
}
