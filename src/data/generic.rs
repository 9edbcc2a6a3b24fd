//! JSONL and CSV files with named fields: by default the Hugging Face dataset's column names
//! (`sentence1`, `sentence2`, `label`, ...; IMDb: `text`, `label`), else `--text-field(s)` and
//! `--label-field`. Labels may be label names or integer ids in the Hub's order; a missing or
//! null label (or a negative id) means an unlabelled example.

use std::path::Path;

use serde_json::Value;

use super::{DataError, Example, Fields, Resolved};
use crate::data::task::{Label, Task};

/// Reads a JSONL file: one JSON object per line; blank lines are skipped.
pub fn read_jsonl(task: &Task, path: &Path, fields: &Fields) -> Result<Vec<Example>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    parse_jsonl(task, path, &text, fields)
}

/// As [`read_jsonl`], from the file's contents (`path` is for messages).
pub fn parse_jsonl(
    task: &Task,
    path: &Path,
    text: &str,
    fields: &Fields,
) -> Result<Vec<Example>, DataError> {
    let cols = resolve(task, path, fields)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut rows = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l)
            .map_err(|e| DataError::row(path, line, format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| DataError::row(path, line, "expected a JSON object"))?;
        let text_of = |name: &str| -> Result<String, DataError> {
            match obj.get(name) {
                Some(Value::String(s)) => Ok(task.clean_text(s.clone())),
                Some(other) => Err(DataError::row(
                    path,
                    line,
                    format!("field `{name}` is {other}, expected a string"),
                )),
                None => Err(DataError::row(
                    path,
                    line,
                    format!("no field `{name}` (fields: {})", keys(obj)),
                )),
            }
        };
        let text_a = text_of(&cols.text[0])?;
        let text_b = match cols.text.get(1) {
            Some(n) => Some(text_of(n)?),
            None => None,
        };
        let label = match obj.get(&cols.label) {
            None | Some(Value::Null) => None,
            Some(v) => json_label(task, v).map_err(|m| DataError::row(path, line, m))?,
        };
        let id = cols
            .index
            .iter()
            .find_map(|c| match obj.get(c) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| rows.len().to_string());
        rows.push((
            line,
            Example {
                text_a,
                text_b,
                label,
                id,
            },
        ));
    }
    all_or_none_labelled(task, path, &cols, rows)
}

fn json_label(task: &Task, v: &Value) -> Result<Option<Label>, String> {
    match v {
        Value::Number(n) if task.is_regression() => n
            .as_f64()
            .map(|s| Some(Label::Score(s)))
            .ok_or_else(|| format!("unparsable score `{n}`")),
        Value::Number(n) => match n.as_i64() {
            Some(id) => task.label_from_hub_id(id),
            None => Err(format!(
                "label `{n}` is not an integer id ({} labels: {})",
                task.title,
                task.labels.join(", ")
            )),
        },
        Value::String(s) => task.label_from_text(s).map(Some),
        other => Err(format!("label is {other}, expected a number or a string")),
    }
}

/// Reads a CSV file with a header row (quoted fields as RFC 4180); an empty label cell means an
/// unlabelled example.
pub fn read_csv(task: &Task, path: &Path, fields: &Fields) -> Result<Vec<Example>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    parse_csv(task, path, &text, fields)
}

/// As [`read_csv`], from the file's contents (`path` is for messages).
pub fn parse_csv(
    task: &Task,
    path: &Path,
    text: &str,
    fields: &Fields,
) -> Result<Vec<Example>, DataError> {
    let cols = resolve(task, path, fields)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let csv_err = |e: csv::Error| {
        let line = e.position().map_or(0, |p| p.line() as usize);
        let msg = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!("{len} fields, expected {expected_len} as in the header"),
            _ => e.to_string(),
        };
        DataError::row(path, line, msg)
    };
    let header = reader.headers().map_err(csv_err)?.clone();
    let col = |name: &str| header.iter().position(|h| h == name);
    let missing = |name: &str| {
        DataError::row(
            path,
            1,
            format!(
                "no column `{name}` in the header (columns: {})",
                header.iter().collect::<Vec<_>>().join(", ")
            ),
        )
    };
    let text_idx: Vec<usize> = cols
        .text
        .iter()
        .map(|c| col(c).ok_or_else(|| missing(c)))
        .collect::<Result<_, _>>()?;
    let label_idx = col(&cols.label);
    let id_idx = cols.index.iter().find_map(|c| col(c));
    let mut rows = Vec::new();
    for rec in reader.records() {
        let rec = rec.map_err(csv_err)?;
        let line = rec.position().map_or(0, |p| p.line() as usize);
        let label = match label_idx.map(|i| rec[i].trim()) {
            None | Some("") => None,
            Some(s) if task.is_regression() => Some(
                task.parse_label(s)
                    .map_err(|m| DataError::row(path, line, m))?,
            ),
            Some(s) => match s.parse::<i64>() {
                Ok(id) if id < 0 => None,
                _ => Some(
                    task.label_from_text(s)
                        .map_err(|m| DataError::row(path, line, m))?,
                ),
            },
        };
        let id = id_idx.map_or_else(|| rows.len().to_string(), |i| rec[i].to_string());
        rows.push((
            line,
            Example {
                text_a: task.clean_text(rec[text_idx[0]].to_string()),
                text_b: text_idx
                    .get(1)
                    .map(|&i| task.clean_text(rec[i].to_string())),
                label,
                id,
            },
        ));
    }
    all_or_none_labelled(task, path, &cols, rows)
}

fn resolve(task: &Task, path: &Path, fields: &Fields) -> Result<Resolved, DataError> {
    fields
        .resolve(&task.hub)
        .map_err(|m| DataError::file(path, m))
}

fn keys(obj: &serde_json::Map<String, Value>) -> String {
    obj.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// A split is labelled throughout or not at all (a test split): a mix is an error at the first
/// unlabelled row.
pub(crate) fn all_or_none_labelled(
    task: &Task,
    path: &Path,
    cols: &Resolved,
    rows: Vec<(usize, Example)>,
) -> Result<Vec<Example>, DataError> {
    let labelled = rows.iter().filter(|(_, e)| e.label.is_some()).count();
    if labelled > 0
        && labelled < rows.len()
        && let Some((line, _)) = rows.iter().find(|(_, e)| e.label.is_none())
    {
        return Err(DataError::row(
            path,
            *line,
            format!(
                "no label (field `{}`) although {labelled} other rows have one ({} labels: {})",
                cols.label,
                task.title,
                if task.is_regression() {
                    "a score".to_string()
                } else {
                    task.labels.join(", ")
                }
            ),
        ));
    }
    Ok(rows.into_iter().map(|(_, e)| e).collect())
}
