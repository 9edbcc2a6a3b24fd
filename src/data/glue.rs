//! GLUE's TSV files exactly as distributed: tab-separated and *not* quoted (a `"` is an ordinary
//! character), a header naming the columns except in CoLA's train and dev files, a UTF-8 BOM
//! before MRPC's header, and no label column in test files.

use std::path::Path;

use super::{DataError, Example, Fields};
use crate::data::task::Task;

/// Reads a GLUE TSV file of `task` (or any TSV with a header, with `fields` naming its columns).
pub fn read_tsv(task: &Task, path: &Path, fields: &Fields) -> Result<Vec<Example>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    parse_tsv(task, path, &text, fields)
}

/// As [`read_tsv`], from the file's contents (`path` is for messages).
pub fn parse_tsv(
    task: &Task,
    path: &Path,
    text: &str,
    fields: &Fields,
) -> Result<Vec<Example>, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let cols = fields
        .resolve(&task.tsv)
        .map_err(|m| DataError::file(path, m))?;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let Some((_, first)) = lines.next() else {
        return Ok(Vec::new());
    };
    let header: Vec<&str> = first.split('\t').collect();
    let is_header = cols.text.iter().all(|c| header.contains(&c.as_str()));
    if !is_header {
        return match task.headerless {
            Some(h) if fields.text.is_empty() => {
                let all = std::iter::once((1, first)).chain(lines);
                headerless(task, path, all, h)
            }
            _ => Err(DataError::row(
                path,
                1,
                format!(
                    "expected a header naming the column{} {} ({}'s GLUE format), found `{}`",
                    if cols.text.len() > 1 { "s" } else { "" },
                    cols.text.join(", "),
                    task.title,
                    shorten(first)
                ),
            )),
        };
    }
    let col = |name: &str| header.iter().position(|h| *h == name);
    let text_idx: Vec<usize> = cols.text.iter().map(|c| col(c).expect("checked")).collect();
    let label_idx = col(&cols.label);
    let id_idx = cols.index.iter().find_map(|c| col(c));
    let mut out = Vec::new();
    for (line, l) in lines {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() != header.len() {
            return Err(DataError::row(
                path,
                line,
                format!(
                    "{} tab-separated field{}, expected {} as in the header",
                    f.len(),
                    if f.len() == 1 { "" } else { "s" },
                    header.len()
                ),
            ));
        }
        let label = match label_idx {
            Some(i) => Some(
                task.parse_label(f[i])
                    .map_err(|m| DataError::row(path, line, m))?,
            ),
            None => None,
        };
        let id = match id_idx {
            Some(i) => f[i].to_string(),
            None => out.len().to_string(),
        };
        out.push(Example {
            text_a: task.clean_text(f[text_idx[0]].to_string()),
            text_b: text_idx.get(1).map(|&i| task.clean_text(f[i].to_string())),
            label,
            id,
        });
    }
    Ok(out)
}

/// CoLA's train/dev layout: `source, label, original label, sentence`, no header.
fn headerless<'a>(
    task: &Task,
    path: &Path,
    lines: impl Iterator<Item = (usize, &'a str)>,
    h: super::task::Headerless,
) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for (line, l) in lines {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() != h.columns {
            return Err(DataError::row(
                path,
                line,
                format!(
                    "{} tab-separated field{}, expected {} ({}'s GLUE format has no header: {})",
                    f.len(),
                    if f.len() == 1 { "" } else { "s" },
                    h.columns,
                    task.title,
                    "source, label, original label, sentence"
                ),
            ));
        }
        let label = task
            .parse_label(f[h.label])
            .map_err(|m| DataError::row(path, line, m))?;
        out.push(Example {
            text_a: task.clean_text(f[h.text].to_string()),
            text_b: None,
            label: Some(label),
            id: out.len().to_string(),
        });
    }
    Ok(out)
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s.to_string()
    }
}
