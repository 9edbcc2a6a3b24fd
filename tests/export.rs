//! `mpcformer export` and `load-check`: round trips bit-identical to the source for BERT and
//! RoBERTa in every approximation variant (through `load_pretrained` and through `eval`), run
//! exports with their provenance, f16, value ranges against the fixtures, `pytorch_model.bin`
//! against `model.safetensors`, and tampering.

mod common;
mod datagen;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::prelude::*;
use mpcformer::data::{self, Fields, Task, Tokenized};
use mpcformer::eval;
use mpcformer::export::{
    self, Dtype, ExportOptions, MANIFEST, Manifest, RangeStats, Source, load_check,
};
use mpcformer::io::{HostTensor, batch_from_safetensors};
use mpcformer::model::{Act, Attn, LayerOverride, Overrides, load_pretrained};
use mpcformer::train::recipe::Recipe;
use serde_json::{Value, json};

use common::{fixtures, load};
use datagen::{mnli_dev, sst2_dev, tiny_roberta};

fn mpcformer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mpcformer"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.env_remove("RUST_BACKTRACE").output().unwrap();
    eprintln!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const VARIANTS: [(&str, Act, Attn); 4] = [
    ("exact", Act::Gelu, Attn::Softmax),
    ("quad", Act::Quad, Attn::Softmax),
    ("quad_2quad", Act::Quad, Attn::TwoQuad),
    ("quad_2relu", Act::Quad, Attn::TwoRelu),
];

fn approx(act: Act, attn: Attn) -> Overrides {
    Overrides {
        act: Some(act),
        attn: Some(attn),
        ..Overrides::default()
    }
}

fn no_dropout(o: Overrides) -> Overrides {
    Overrides {
        no_dropout: true,
        ..o
    }
}

fn stsb_dev(path: &Path, n: usize) {
    let mut s = String::from(
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n",
    );
    for i in 0..n {
        s += &format!(
            "{i}\tmain-captions\tMSRvid\t2012test\t000{i}\tnone\tnone\ta dog is good\tthe dog was {i}\t{}.000\n",
            i % 6
        );
    }
    std::fs::write(path, s).unwrap();
}

/// A model directory with a tokenizer, a task that fits its head, and dev data for it.
struct Case {
    fixture: &'static str,
    model: PathBuf,
    task: &'static str,
    data: PathBuf,
}

fn case(root: &Path, name: &'static str) -> Case {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    match name {
        "bert" => {
            mnli_dev(&dir.join("dev.tsv"), 11);
            Case {
                fixture: "tiny-bert",
                model: datagen::tiny_model("tiny-bert", &dir.join("model")),
                task: "mnli",
                data: dir.join("dev.tsv"),
            }
        }
        "roberta" => {
            sst2_dev(&dir.join("dev.tsv"), 9);
            Case {
                fixture: "tiny-roberta",
                model: tiny_roberta(&dir.join("model")),
                task: "sst2",
                data: dir.join("dev.tsv"),
            }
        }
        "regression" => {
            stsb_dev(&dir.join("dev.tsv"), 8);
            Case {
                fixture: "tiny-bert-regression",
                model: datagen::tiny_model("tiny-bert-regression", &dir.join("model")),
                task: "stsb",
                data: dir.join("dev.tsv"),
            }
        }
        _ => unreachable!(),
    }
}

fn options(c: &Case, overrides: Overrides, out: &Path) -> ExportOptions {
    ExportOptions {
        overrides,
        task: Some(c.task.into()),
        data: Some(c.data.to_string_lossy().into()),
        batch_size: 4,
        ..ExportOptions::new(Source::Model(c.model.to_string_lossy().into()), out)
    }
}

fn bits(t: Tensor<2>) -> Vec<u32> {
    t.into_data()
        .try_into_vec::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn floats(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

/// Logits of the export and of its source, as `mpcformer eval --model <dir>` computes them:
/// `load_for_task`, the directory's own tokenizer, length-sorted batches.
fn eval_logits(model: &Path, overrides: &Overrides, c: &Case) -> (Vec<Vec<u32>>, Vec<u32>) {
    let task = Task::find(c.task).unwrap();
    let setup = eval::Setup {
        model: model.to_string_lossy().into(),
        overrides: overrides.clone(),
        allow_random_head: false,
        batch_size: 3,
        max_len: None,
        data: Some(c.data.to_string_lossy().into()),
        sample: None,
        fields: Fields::default(),
        device: Device::flex(),
    };
    let tm = eval::load_for_task(&setup, task).unwrap();
    let split = task.resolve_splits("dev").unwrap()[0];
    let set = data::load(task, setup.data.as_deref(), split, &Fields::default()).unwrap();
    let tok = Tokenized::new(&set, &tm.tokenizer).unwrap();
    let out = eval::run_model(&tm.model, &tok, 3, &setup.device, "test");
    let ids = tok
        .encoded
        .iter()
        .map(|e| e.ids.clone())
        .collect::<Vec<_>>();
    (ids, out.logits.iter().map(|x| x.to_bits()).collect())
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST)).unwrap()).unwrap()
}

fn config_json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn round_trip_is_bit_identical_for_bert_and_roberta_in_every_variant() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Device::flex();
    for name in ["bert", "roberta"] {
        let c = case(tmp.path(), name);
        for (variant, act, attn) in VARIANTS {
            let out = tmp.path().join(format!("{name}-{variant}"));
            let report = export::export(&options(&c, approx(act, attn), &out))
                .unwrap_or_else(|e| panic!("{name} {variant}: {e:#}"));
            let what = format!("{name} {variant}");

            // As `load_pretrained` reads it: the fixture batches give bit-identical logits.
            let src = load_pretrained(
                &c.model.to_string_lossy(),
                &no_dropout(approx(act, attn)),
                &device,
            )
            .unwrap();
            let exp = load_pretrained(
                &out.to_string_lossy(),
                &no_dropout(Overrides::default()),
                &device,
            )
            .unwrap();
            assert!(
                exp.report.initialised.is_empty() && exp.report.unexpected.is_empty(),
                "{what}: {}",
                exp.report
            );
            assert_eq!(exp.model.config.approx, src.model.config.approx, "{what}");
            for b in 0..3 {
                let inputs = batch_from_safetensors(
                    &fixtures()
                        .join(c.fixture)
                        .join(format!("batch{b}.safetensors")),
                    &device,
                )
                .unwrap();
                assert_eq!(
                    bits(exp.model.logits(&inputs)),
                    bits(src.model.logits(&inputs)),
                    "{what}: batch {b}"
                );
            }

            // As `mpcformer eval --model <export>` runs it (the export's tokenizer.json against
            // the source's vocabulary files): the same ids and bit-identical logits.
            let (src_ids, src_logits) = eval_logits(&c.model, &approx(act, attn), &c);
            let (exp_ids, exp_logits) = eval_logits(&out, &Overrides::default(), &c);
            assert_eq!(exp_ids, src_ids, "{what}: token ids");
            assert_eq!(exp_logits, src_logits, "{what}: eval logits");

            // The directory and its manifest.
            for f in [
                "config.json",
                "model.safetensors",
                "pytorch_model.bin",
                "tokenizer.json",
                "tokenizer_config.json",
                MANIFEST,
            ] {
                assert!(out.join(f).is_file(), "{what}: no {f}");
            }
            let m = manifest(&out);
            assert_eq!(m.task.as_deref(), Some(c.task));
            let task = Task::find(c.task).unwrap();
            assert_eq!(m.labels, task.head_labels().0, "{what}");
            assert_eq!(m.dtype, Dtype::F32);
            assert_eq!(m.approximations["hidden_act"], act.hf_name());
            assert_eq!(m.approximations["softmax_act"], attn.hf_name());
            let ops: Vec<String> = m.value_ranges.as_ref().unwrap()["ops"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["op"].as_str().unwrap().to_string())
                .collect();
            let want = match attn {
                Attn::TwoQuad => "layer.1.2quad.row_sum",
                Attn::TwoRelu => "layer.1.2relu.row_sum",
                Attn::Softmax => "layer.1.softmax.row_sum",
            };
            assert!(ops.iter().any(|o| o == want), "{what}: {ops:?}");
            let ffn = if act == Act::Quad {
                "layer.0.intermediate.quad.square"
            } else {
                "layer.0.intermediate.gelu"
            };
            assert!(ops.iter().any(|o| o == ffn), "{what}: {ops:?}");
            assert!(ops.iter().any(|o| o == "embeddings.LayerNorm.inv_sqrt"));
            let dev = m.dev_metrics.as_ref().unwrap();
            assert_eq!(dev["examples"], if name == "bert" { 11 } else { 9 });
            assert!(dev["metrics"]["accuracy"].is_f64(), "{what}: {dev}");
            assert!(report.notes.iter().all(|n| !n.contains("recomputed")));
            let check = load_check(&out).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert!(check.passed.len() >= 5, "{what}: {:?}", check.passed);

            // The config names the approximations as transformers and MPCFormer read them.
            let cfg = config_json(&out);
            assert_eq!(cfg["hidden_act"], act.hf_name());
            assert_eq!(cfg["softmax_act"], attn.hf_name());
            assert_eq!(
                cfg["model_type"],
                if name == "bert" { "bert" } else { "roberta" }
            );
            assert_eq!(cfg["id2label"]["0"], task.head_labels().0[0]);
        }
    }
}

#[test]
fn regression_heads_export_with_the_task_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let c = case(tmp.path(), "regression");
    let out = tmp.path().join("out");
    let o = approx(Act::Quad, Attn::TwoQuad);
    export::export(&options(&c, o.clone(), &out)).unwrap();
    let m = manifest(&out);
    assert!(m.regression);
    assert_eq!(config_json(&out)["problem_type"], "regression");
    let dev = m.dev_metrics.unwrap();
    assert!(dev["metrics"]["pearson"].is_f64(), "{dev}");
    let (_, a) = eval_logits(&c.model, &o, &c);
    let (_, b) = eval_logits(&out, &Overrides::default(), &c);
    assert_eq!(a, b);
    load_check(&out).unwrap();

    // A head that does not fit the task is refused.
    let mut wrong = options(&c, o, &tmp.path().join("wrong"));
    wrong.task = Some("rte".into());
    let e = format!("{:#}", export::export(&wrong).unwrap_err());
    assert!(e.contains("RTE needs 2"), "{e}");
    assert!(!tmp.path().join("wrong").exists());
}

#[test]
fn per_layer_choices_travel_in_the_mpc_object() {
    let tmp = tempfile::tempdir().unwrap();
    let c = case(tmp.path(), "bert");
    let out = tmp.path().join("out");
    let mut o = approx(Act::Quad, Attn::TwoQuad);
    o.layers = vec![(
        0,
        LayerOverride {
            act: Some(Act::Gelu),
            attn: Some(Attn::Softmax),
        },
    )];
    export::export(&options(&c, o.clone(), &out)).unwrap();
    let cfg = config_json(&out);
    let mpc = &cfg["mpc"];
    assert_eq!(
        mpc["layers"],
        json!({"0": {"act": "gelu", "attn": "softmax"}})
    );
    assert_eq!(
        mpc["per_layer"],
        json!([
            {"hidden_act": "gelu", "softmax_act": "softmax"},
            {"hidden_act": "quad", "softmax_act": "2quad"}
        ])
    );
    // Exact formulas and constants, from the code that computes them.
    use mpcformer::model::approx::{MASK_NEG, QUAD_A, QUAD_B, QUAD_C, TWO_QUAD_C};
    assert_eq!(
        (
            mpc["quad"]["a"].as_f64(),
            mpc["quad"]["b"].as_f64(),
            mpc["quad"]["c"].as_f64()
        ),
        (Some(QUAD_A), Some(QUAD_B), Some(QUAD_C))
    );
    assert_eq!(mpc["2quad"]["c"].as_f64(), Some(TWO_QUAD_C));
    assert_eq!(mpc["softmax"]["mask_value"].as_f64(), Some(MASK_NEG));
    assert!(
        mpc["mask"]["2quad"]
            .as_str()
            .unwrap()
            .contains("after squaring")
    );
    assert!(mpc["2relu"].is_null(), "only the ops the model uses");
    let m = manifest(&out);
    let ops = m.value_ranges.unwrap()["ops"].to_string();
    assert!(ops.contains("layer.0.softmax.row_sum") && ops.contains("layer.1.2quad.row_sum"));
    let (_, a) = eval_logits(&c.model, &o, &c);
    let (_, b) = eval_logits(&out, &Overrides::default(), &c);
    assert_eq!(a, b);
}

/// A finished run directory in the layout `mpcformer run` writes, around the tiny BERT.
fn fake_run(root: &Path, c: &Case, student_metric: f64) -> PathBuf {
    let run = root.join("runs/tiny");
    std::fs::create_dir_all(&run).unwrap();
    let recipe_src = root.join("tiny.toml");
    std::fs::write(
        &recipe_src,
        format!(
            "name = \"tiny\"\nstages = [\"stage1\", \"stage2\"]\noutput_dir = {:?}\n\
             [teacher]\nmodel = {:?}\n[student]\nact = \"quad\"\nattn = \"2quad\"\n\
             layers = {{ \"1\" = {{ attn = \"softmax\" }} }}\n\
             [data]\ntask = \"mnli\"\nspec = {:?}\n",
            root.join("runs").display().to_string(),
            c.model.display().to_string(),
            c.data.display().to_string()
        ),
    )
    .unwrap();
    let recipe = Recipe::load(&recipe_src, &[]).unwrap();
    std::fs::write(run.join("recipe.toml"), recipe.resolved_toml()).unwrap();
    let device = Device::flex();
    let o = Overrides {
        layers: vec![(
            1,
            LayerOverride {
                act: None,
                attn: Some(Attn::Softmax),
            },
        )],
        ..approx(Act::Quad, Attn::TwoQuad)
    };
    let student = load_pretrained(&c.model.to_string_lossy(), &o, &device).unwrap();
    student
        .model
        .save_pretrained(&run.join("student"), Some(&c.model))
        .unwrap();
    let teacher =
        load_pretrained(&c.model.to_string_lossy(), &Overrides::default(), &device).unwrap();
    teacher
        .model
        .save_pretrained(&run.join("teacher"), Some(&c.model))
        .unwrap();
    let summary = json!({
        "name": "tiny",
        "task": "mnli",
        "seed": 42,
        "recipe_hash": recipe.hash(),
        "teacher": {"approximations": "gelu+softmax", "metrics": {"accuracy": 0.5}, "primary": 0.5},
        "student": {"approximations": "quad+2quad", "metrics": {"accuracy": student_metric}, "primary": student_metric},
    });
    std::fs::write(run.join("summary.json"), summary.to_string()).unwrap();
    run
}

#[test]
fn run_exports_record_task_recipe_teacher_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let c = case(tmp.path(), "bert");
    let run = fake_run(tmp.path(), &c, 0.125);
    let out = tmp.path().join("export");
    let report = export::export(&ExportOptions::new(Source::Run(run.clone()), &out)).unwrap();
    let m = manifest(&out);
    assert_eq!(m.source["kind"], "run");
    assert_eq!(m.task.as_deref(), Some("mnli"));
    assert_eq!(m.labels, ["contradiction", "entailment", "neutral"]);
    assert_eq!(
        m.max_length, 64,
        "MNLI's 128, capped by the model's 64 positions"
    );
    let recipe = m.recipe.as_ref().unwrap();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(recipe["sha256"], summary["recipe_hash"]);
    assert_eq!(recipe["summary_recipe_hash"], summary["recipe_hash"]);
    assert_eq!(recipe["content"]["student"]["act"], "quad");
    assert_eq!(
        std::fs::read(out.join("recipe.toml")).unwrap(),
        std::fs::read(run.join("recipe.toml")).unwrap()
    );
    let teacher = m.teacher.as_ref().unwrap();
    assert_eq!(teacher["model"], c.model.display().to_string());
    assert_eq!(teacher["dev_metrics"]["accuracy"], 0.5);
    assert_eq!(teacher["fine_tuned_in_run"], false);
    assert!(teacher["checkpoint_sha256"].as_str().unwrap().len() == 64);
    let dev = m.dev_metrics.as_ref().unwrap();
    assert_eq!(dev["at_training"]["accuracy"], 0.125);
    assert_eq!(dev["split"], "dev_matched");
    assert!(dev["metrics"]["accuracy"].is_f64());
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("differ from the run")),
        "a metric drift is reported: {:?}",
        report.notes
    );
    assert_eq!(
        m.approximations["per_layer"][1]["softmax_act"], "softmax",
        "per-layer choices of the student"
    );
    load_check(&out).unwrap();
    p1_part_is_public_and_the_same_circuit(&out);
    // The run's student gives the same logits as the export.
    let device = Device::flex();
    let inputs =
        batch_from_safetensors(&fixtures().join("tiny-bert/batch1.safetensors"), &device).unwrap();
    let a = load_pretrained(
        &run.join("student").to_string_lossy(),
        &no_dropout(Overrides::default()),
        &device,
    )
    .unwrap();
    let b = load_pretrained(
        &out.to_string_lossy(),
        &no_dropout(Overrides::default()),
        &device,
    )
    .unwrap();
    assert_eq!(bits(a.model.logits(&inputs)), bits(b.model.logits(&inputs)));

    // A student saved before config.json carried per-layer choices: the recipe's are used.
    let cfg_path = run.join("student/config.json");
    let mut cfg = config_json(&run.join("student"));
    cfg.as_object_mut().unwrap().remove("mpc");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out2 = tmp.path().join("export2");
    let report = export::export(&ExportOptions::new(Source::Run(run.clone()), &out2)).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("recipe.toml")),
        "{:?}",
        report.notes
    );
    assert_eq!(
        manifest(&out2).approximations["per_layer"][1]["softmax_act"],
        "softmax"
    );

    // Approximation flags do not apply to a run.
    let mut o = ExportOptions::new(Source::Run(run), tmp.path().join("export3"));
    o.overrides.act = Some(Act::Gelu);
    let e = format!("{:#}", export::export(&o).unwrap_err());
    assert!(e.contains("--model exports"), "{e}");
}

#[test]
fn f16_exports_load_and_are_close() {
    let tmp = tempfile::tempdir().unwrap();
    let c = case(tmp.path(), "roberta");
    let o = approx(Act::Quad, Attn::TwoQuad);
    let out = tmp.path().join("f16");
    let mut opts = options(&c, o.clone(), &out);
    opts.dtype = Dtype::F16;
    let report = export::export(&opts).unwrap();
    assert_eq!(manifest(&out).dtype, Dtype::F16);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(
        st.tensors()
            .iter()
            .all(|(_, v)| v.dtype() == safetensors::Dtype::F16)
    );
    let f32_size = std::fs::metadata(c.model.join("model.safetensors"))
        .unwrap()
        .len();
    assert!((bytes.len() as u64) < f32_size * 6 / 10);
    assert!(report.notes.iter().any(|n| n.contains("f16")));
    load_check(&out).unwrap();

    let device = Device::flex();
    let src = load_pretrained(&c.model.to_string_lossy(), &no_dropout(o), &device).unwrap();
    let exp = load_pretrained(
        &out.to_string_lossy(),
        &no_dropout(Overrides::default()),
        &device,
    )
    .unwrap();
    for b in 0..3 {
        let inputs = batch_from_safetensors(
            &fixtures().join(format!("tiny-roberta/batch{b}.safetensors")),
            &device,
        )
        .unwrap();
        let a = floats(src.model.logits(&inputs));
        let e = floats(exp.model.logits(&inputs));
        let diff = a
            .iter()
            .zip(&e)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(
            diff <= 1e-2 * scale.max(1.0),
            "batch {b}: f16 logits differ by {diff} (scale {scale})"
        );
        assert!(diff > 0.0, "f16 really rounds the weights");
    }
}

/// The records of a stored ZIP archive, walked through its local headers (independently of
/// `export::torch_bin`'s reader, which goes through the central directory): name, data offset
/// and data.
fn zip_records(bytes: &[u8]) -> Vec<(String, usize, Vec<u8>)> {
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut at = 0;
    while u32_at(at) == 0x0403_4b50 {
        assert_eq!(u16_at(at + 8), 0, "stored, not compressed");
        let size = u32_at(at + 22);
        assert_eq!(u32_at(at + 18), size);
        let (name_len, extra_len) = (u16_at(at + 26), u16_at(at + 28));
        let name = String::from_utf8(bytes[at + 30..at + 30 + name_len].to_vec()).unwrap();
        let extra = &bytes[at + 30 + name_len..at + 30 + name_len + extra_len];
        // At most one extra field, PyTorch's padding id `FB`, its length covering the rest (none
        // when the data falls aligned); what the padding holds is the ZIP writer's (readers skip
        // it), its purpose the alignment checked below.
        if extra_len > 0 {
            assert_eq!(&extra[..2], b"FB", "{name}: PyTorch's padding field");
            assert_eq!(u16_at(at + 30 + name_len + 2), extra_len - 4, "{name}");
        }
        let offset = at + 30 + name_len + extra_len;
        out.push((name, offset, bytes[offset..offset + size].to_vec()));
        at = offset + size;
    }
    assert_eq!(u32_at(at), 0x0201_4b50, "the central directory follows");
    out
}

#[test]
fn pytorch_bin_holds_the_safetensors_tensors() {
    use mpcformer::export::torch_bin;
    let tmp = tempfile::tempdir().unwrap();
    for (name, dtype) in [("bert", Dtype::F32), ("roberta", Dtype::F16)] {
        let c = case(tmp.path(), name);
        let out = tmp.path().join(format!("{name}-bin"));
        let mut o = options(&c, approx(Act::Quad, Attn::TwoQuad), &out);
        o.dtype = dtype;
        o.no_data = true;
        export::export(&o).unwrap();
        let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        let mut names = st.names();
        names.sort();
        let bin = std::fs::read(out.join("pytorch_model.bin")).unwrap();

        // The archive as written: PyTorch's records, each one's data 64-byte aligned, storage
        // `data/i` holding the i-th tensor (by name) byte for byte.
        let records = zip_records(&bin);
        let mut want = vec![
            "pytorch_model/data.pkl".to_string(),
            "pytorch_model/byteorder".into(),
        ];
        want.extend((0..names.len()).map(|i| format!("pytorch_model/data/{i}")));
        want.push("pytorch_model/version".into());
        assert_eq!(
            records.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            want
        );
        for (rname, offset, _) in &records {
            assert_eq!(offset % 64, 0, "{name}: {rname} at {offset}");
        }
        assert_eq!(records[1].2, b"little");
        assert_eq!(records.last().unwrap().2, b"3\n");
        for (i, n) in names.iter().enumerate() {
            assert_eq!(
                records[2 + i].2,
                st.tensor(n).unwrap().data(),
                "{name}: {n}"
            );
        }
        let pkl = &records[0].2;
        assert_eq!(&pkl[..2], b"\x80\x02", "pickle protocol 2");
        assert_eq!(pkl.last(), Some(&b'.'));
        let storage = match dtype {
            Dtype::F32 => "torch\nFloatStorage\n",
            Dtype::F16 => "torch\nHalfStorage\n",
        };
        let text = String::from_utf8_lossy(pkl);
        for g in [
            "collections\nOrderedDict\n",
            "torch._utils\n_rebuild_tensor_v2\n",
            storage,
        ] {
            assert!(text.contains(g), "{name}: no GLOBAL {g:?}");
        }

        // Read back (names in order, shapes, dtype, values) and checked by load-check.
        let sd = torch_bin::read(&bin).unwrap();
        assert_eq!(sd.archive, "pytorch_model");
        assert_eq!(
            sd.tensors
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            names
        );
        for t in &sd.tensors {
            let v = st.tensor(&t.name).unwrap();
            assert_eq!(t.shape, v.shape(), "{}", t.name);
            assert_eq!(t.storage.safetensors(), v.dtype(), "{}", t.name);
            assert_eq!(t.data, v.data(), "{}", t.name);
        }
        let m = manifest(&out);
        assert_eq!(
            m.files["pytorch_model.bin"],
            export::sha256_file(&out.join("pytorch_model.bin")).unwrap()
        );
        let check = load_check(&out).unwrap();
        assert!(
            check
                .passed
                .iter()
                .any(|p| p.starts_with("pytorch_model.bin")),
            "{:?}",
            check.passed
        );

        // A changed storage byte: the hash names the file; with the hash updated, the CRC.
        let mut bad = bin.clone();
        bad[records[2].1] ^= 0x40;
        std::fs::write(out.join("pytorch_model.bin"), &bad).unwrap();
        let e = format!("{:#}", load_check(&out).unwrap_err());
        assert!(e.contains("pytorch_model.bin: sha256"), "{e}");
        let mut mv: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(MANIFEST)).unwrap()).unwrap();
        mv["files"]["pytorch_model.bin"] =
            serde_json::to_value(export::sha256_file(&out.join("pytorch_model.bin")).unwrap())
                .unwrap();
        std::fs::write(out.join(MANIFEST), mv.to_string()).unwrap();
        let e = format!("{:#}", load_check(&out).unwrap_err());
        assert!(
            e.contains("pytorch_model.bin") && e.contains("CRC-32"),
            "{e}"
        );
    }

    // `--no-pytorch-bin` leaves it out (and out of the manifest).
    let c = case(tmp.path(), "bert");
    let out = tmp.path().join("no-bin");
    let o = run(mpcformer()
        .args(["export", "--no-data", "--no-pytorch-bin", "--model"])
        .arg(&c.model)
        .args(["--task", "mnli", "--out"])
        .arg(&out));
    assert!(o.status.success());
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("pytorch_model.bin").exists());
    assert!(!manifest(&out).files.contains_key("pytorch_model.bin"));
    load_check(&out).unwrap();
}

/// The captured ranges against the fixtures' PyTorch tensors (quad+2quad, BERT).
#[test]
fn value_ranges_match_the_reference_tensors() {
    let device = Device::flex();
    let fx = fixtures().join("tiny-bert");
    for (variant, act, attn) in [
        ("quad_2quad", Act::Quad, Attn::TwoQuad),
        ("exact", Act::Gelu, Attn::Softmax),
    ] {
        let model = load_pretrained(
            &fx.join("model").to_string_lossy(),
            &no_dropout(approx(act, attn)),
            &device,
        )
        .unwrap()
        .model;
        let mut stats = RangeStats::default();
        let mut scores_max = [0f64; 2];
        let mut shifted_max = [0f64; 2];
        for b in 0..3 {
            let path = fx.join(format!("batch{b}.safetensors"));
            let inputs = batch_from_safetensors(&path, &device).unwrap();
            let logits = stats.capture(&model, &inputs);
            let reference = load(&path);
            let want = reference[&format!("{variant}.logits")].to_f64();
            let got = HostTensor::from_float(logits).to_f64();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{variant} logits {g} vs {w}");
            }
            for l in 0..2 {
                let s = reference[&format!("{variant}.attention_scores.{l}")].to_f64();
                scores_max[l] = s.iter().fold(scores_max[l], |m, x| m.max(x.abs()));
                shifted_max[l] = s.iter().fold(shifted_max[l], |m, x| m.max((x + 5.0).abs()));
            }
        }
        assert!(
            stats.recompute_error < 1e-4,
            "{variant}: {}",
            stats.recompute_error
        );
        for l in 0..2 {
            let got = stats.get(&format!("layer.{l}.attention.scores")).unwrap();
            assert!(
                (got - scores_max[l]).abs() < 1e-4 * scores_max[l].max(1.0),
                "{variant} layer {l}: max |s| {got} vs {}",
                scores_max[l]
            );
            if attn == Attn::TwoQuad {
                let got = stats.get(&format!("layer.{l}.2quad.square")).unwrap();
                assert!(
                    (got - shifted_max[l]).abs() < 1e-4 * shifted_max[l],
                    "layer {l}: max |s + c| {got} vs {}",
                    shifted_max[l]
                );
            }
        }
        let ranges = stats.ranges(16);
        let sq = ranges
            .iter()
            .find(|r| r.op == "layer.0.2quad.square" || r.op == "layer.0.softmax.exp")
            .unwrap();
        if attn == Attn::TwoQuad {
            let want = 63.0 - 32.0 - 2.0 * sq.max_abs.log2();
            assert!((sq.headroom_bits - want).abs() < 1e-3);
        }
        for r in ranges.iter().filter(|r| r.min.is_some()) {
            assert!(r.min.unwrap() > 0.0 && r.min.unwrap() <= r.max_abs, "{r:?}");
        }
    }
}

#[test]
fn load_check_catches_tampering_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let c = case(tmp.path(), "bert");
    let out = tmp.path().join("export");
    // End to end through the command line.
    let o = run(mpcformer()
        .args(["export", "--model"])
        .arg(&c.model)
        .args([
            "--task", "mnli", "--act", "quad", "--attn", "2quad", "--data",
        ])
        .arg(&c.data)
        .arg("--out")
        .arg(&out));
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("exported quad+2quad"));
    let o = run(mpcformer().arg("load-check").arg(&out));
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains(": OK"));

    // One changed byte in the weights.
    let weights = out.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let mut bytes = original.clone();
    let i = bytes.len() - 5;
    bytes[i] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let e = format!("{:#}", load_check(&out).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("sha256"),
        "{e}"
    );
    let o = run(mpcformer().arg("load-check").arg(&out));
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("model.safetensors: sha256"), "{stderr}");
    std::fs::write(&weights, &original).unwrap();
    load_check(&out).unwrap();

    // A config.json that no longer fits the weights, with its hash updated: the shapes are
    // checked, naming the weights file.
    let mut cfg = config_json(&out);
    cfg["intermediate_size"] = json!(48);
    let text = serde_json::to_string_pretty(&cfg).unwrap();
    std::fs::write(out.join("config.json"), &text).unwrap();
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(MANIFEST)).unwrap()).unwrap();
    m["files"]["config.json"] =
        serde_json::to_value(export::sha256_file(&out.join("config.json")).unwrap()).unwrap();
    std::fs::write(out.join(MANIFEST), m.to_string()).unwrap();
    let e = format!("{:#}", load_check(&out).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("shape"),
        "{e}"
    );

    // Constants this build does not compute with are refused.
    cfg["intermediate_size"] = json!(64);
    cfg["mpc"]["quad"]["b"] = json!(0.5);
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    let e = format!("{:#}", load_check(&out).unwrap_err());
    assert!(e.contains("config.json") && e.contains("quad"), "{e}");

    // A manifest from the future.
    m["format_version"] = json!(99);
    std::fs::write(out.join(MANIFEST), m.to_string()).unwrap();
    let e = format!("{:#}", load_check(&out).unwrap_err());
    assert!(
        e.contains(MANIFEST) && e.contains("format_version 99"),
        "{e}"
    );

    // Not an export at all.
    let e = format!("{:#}", load_check(&c.model).unwrap_err());
    assert!(e.contains("not an export"), "{e}");
}

#[test]
fn exports_replace_only_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let c = case(tmp.path(), "bert");
    let out = tmp.path().join("out");
    let mut o = options(&c, Overrides::default(), &out);
    o.no_data = true;
    export::export(&o).unwrap();
    assert!(manifest(&out).value_ranges.is_none());
    // Again: the earlier export is replaced.
    export::export(&o).unwrap();
    load_check(&out).unwrap();
    // A directory that is not an export is left alone.
    let other = tmp.path().join("precious");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();
    o.out = other.clone();
    let e = format!("{:#}", export::export(&o).unwrap_err());
    assert!(e.contains("not an export"), "{e}");
    assert_eq!(
        std::fs::read_to_string(other.join("notes.txt")).unwrap(),
        "keep me"
    );
    // Nothing temporary is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Without a tokenizer the export says how to give one.
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(c.model.join(f), bare.join(f)).unwrap();
    }
    let mut o = options(&c, Overrides::default(), &tmp.path().join("bare-out"));
    o.source = Source::Model(bare.to_string_lossy().into());
    let e = format!("{:#}", export::export(&o).unwrap_err());
    assert!(e.contains("--tokenizer"), "{e}");
    o.tokenizer = Some(c.model.to_string_lossy().into());
    export::export(&o).unwrap();
}

/// `<export>/p1/`: what P1 needs (config, tokenizer, plans) and nothing of the weights or the
/// run, describing the same circuit (the session settings P0 and P1 compare are equal); a
/// public part that drifts from the export is refused by `load_check`.
fn p1_part_is_public_and_the_same_circuit(out: &Path) {
    use mpcformer::mpc::model::MpcConfig;
    let p1 = out.join(export::P1_DIR);
    let mut files: Vec<String> = std::fs::read_dir(&p1)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    for needed in ["config.json", "mpc_public.json", "tokenizer.json"] {
        assert!(
            files.iter().any(|f| f == needed),
            "{needed} missing: {files:?}"
        );
    }
    for private in [
        "model.safetensors",
        "pytorch_model.bin",
        "recipe.toml",
        MANIFEST,
    ] {
        assert!(
            !files.iter().any(|f| f == private),
            "{private} in p1/: {files:?}"
        );
    }
    let public = std::fs::read_to_string(p1.join(export::PUBLIC_MANIFEST)).unwrap();
    for key in [
        "recipe",
        "dev_metrics",
        "teacher",
        "source",
        "files",
        "sha256",
    ] {
        assert!(!public.contains(&format!("\"{key}\"")), "{key} in {public}");
    }
    let full = MpcConfig::from_export_with(out, None, None).unwrap();
    let part = MpcConfig::from_export_with(&p1, None, None).unwrap();
    assert_eq!(full.settings().parts, part.settings().parts);

    let path = p1.join(export::PUBLIC_MANIFEST);
    let mut v: Value = serde_json::from_str(&public).unwrap();
    v["fixed_point"]["fractional_bits"] = json!(12);
    std::fs::write(&path, v.to_string()).unwrap();
    let e = format!("{:#}", load_check(out).unwrap_err());
    assert!(e.contains("public part"), "{e}");
    std::fs::write(&path, &public).unwrap();
    load_check(out).unwrap();
}
