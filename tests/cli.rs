//! The `mpcformer` binary end to end: `inspect --batch --dump` writes the fixtures' tensor names
//! with the fixtures' values.

mod common;

use std::process::Command;

use common::{assert_close, fixtures, load};

fn mpcformer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mpcformer"))
}

#[test]
fn inspect_batch_dump_matches_fixture() {
    let out_dir = tempfile::tempdir().unwrap();
    let dump = out_dir.path().join("ours.safetensors");
    let fx = fixtures().join("tiny-roberta");
    let status = mpcformer()
        .args(["inspect", "--model"])
        .arg(fx.join("model"))
        .arg("--batch")
        .arg(fx.join("batch1.safetensors"))
        .args(["--act", "quad", "--attn", "2quad", "--dump"])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let ours = load(&dump);
    let reference = load(&fx.join("batch1.safetensors"));
    let mut n = 0;
    for (name, r) in &reference {
        if let Some(short) = name.strip_prefix("quad_2quad.") {
            if short == "loss" {
                continue;
            }
            let tol = if short.starts_with("attentions") {
                1e-5
            } else {
                1e-4
            };
            assert_close(name, &ours[short], r, tol);
            n += 1;
        }
    }
    assert_eq!(
        n,
        3 + 2 + 2 + 1 + 1,
        "hidden states, scores, attentions, pooled, logits"
    );
    assert_eq!(ours["input_ids"], reference["input_ids"]);
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("logits:"), "{stdout}");
}

#[test]
fn inspect_text_prints_tokens() {
    let Some(dir) = common::shared("models/all-MiniLM-L6-v2") else {
        return;
    };
    let out = mpcformer()
        .args(["inspect", "--model"])
        .arg(&dir)
        .args([
            "--text",
            "Hello world",
            "--text",
            "a longer second sentence",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[0] ids:    [101, 7592, 2088, 102]"),
        "{stdout}"
    );
    assert!(stdout.contains("head randomly initialised"), "{stdout}");
}

#[test]
fn inspect_rejects_mismatched_pairs() {
    let out = mpcformer()
        .args(["inspect", "--model"])
        .arg(fixtures().join("tiny-bert/model"))
        .args(["--text", "a", "--text", "b", "--text-pair", "c"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("one pair per text"));
}
