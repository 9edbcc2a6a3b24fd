//! RESULTS.md's tables are exactly what `mpcformer report` makes of the committed `results/`:
//! no number in them is typed by hand or left stale after a run is added.

use std::path::Path;

use mpcformer::report::{find_runs, generated, markdown};

#[test]
fn results_md_tables_are_the_report_of_results_dir() {
    // At run time, not `env!`: a target dir shared between clones may hold a binary built in
    // another checkout, whose RESULTS.md is not this one.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into());
    let root = Path::new(&dir);
    let doc = std::fs::read_to_string(root.join("RESULTS.md")).unwrap();
    let tables = generated(&doc).expect("RESULTS.md has no `mpcformer report` markers");
    let runs = find_runs(&[root.join("results")]).unwrap();
    assert!(!runs.is_empty());
    let md = markdown(&runs);
    assert!(
        tables == md.trim_matches('\n'),
        "RESULTS.md is stale: run `mpcformer report results/ --update RESULTS.md --plots results/plots`"
    );
}

/// The rows of the markdown table whose header line starts with `header`, split into cells.
fn table(md: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = md.lines().skip_while(|l| !l.starts_with(header));
    assert!(lines.next().is_some(), "no table headed `{header}`");
    lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// The mean of a report cell (`27.4 ± 1.0 (n=3)` → `27.4`).
fn mean(cell: &str) -> &str {
    cell.split(" ± ")
        .next()
        .unwrap()
        .split(" (")
        .next()
        .unwrap()
}

/// README's table of the shipped students holds RESULTS.md's figures for them, so the first
/// numbers a reader sees cannot drift from the generated tables.
#[test]
fn readme_students_table_is_results_md() {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into());
    let root = Path::new(&dir);
    let results = std::fs::read_to_string(root.join("RESULTS.md")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    const SHIPPED: &str = "MPCFormer quad+2quad (all-MiniLM-L6-v2)";
    let main_header = results
        .lines()
        .find(|l| l.starts_with("| model | CoLA"))
        .expect("RESULTS.md has its main table");
    let columns: Vec<&str> = main_header
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect();
    let main = table(&results, "| model | CoLA");
    let main_cell = |model: &str, name: &str| {
        let col = columns
            .iter()
            .position(|c| c.split(" (").next() == Some(name))
            .unwrap_or_else(|| panic!("no column {name}"));
        let row = main.iter().find(|r| r[0] == model).expect(model);
        row[col].split(" (n=").next().unwrap().to_string()
    };
    let fidelity = table(
        &results,
        "| model | task | retention | margin retention | agreement |",
    );
    let resolution = table(&results, "| model | task | seeds | examples |");
    let rows = table(&readme, "| task (metric) | trivial | teacher | student |");
    assert_eq!(rows.len(), 6, "one README row per task");
    for row in &rows {
        let name = row[0].split(" (").next().unwrap();
        let task = name.replace('-', "").to_lowercase();
        let fid = fidelity
            .iter()
            .find(|r| r[0] == SHIPPED && r[1] == task)
            .unwrap_or_else(|| panic!("no fidelity row for {task}"));
        let mut margin = mean(&fid[3]).to_string();
        let interval = resolution
            .iter()
            .find(|r| r[0] == SHIPPED && r[1] == task)
            .and_then(|r| r[5].split_once(' ').map(|(_, i)| i.to_string()));
        if let Some(interval) = interval {
            margin = format!("{margin} {interval}");
        }
        let expected = [
            row[0].clone(),
            main_cell("trivial (best constant answer)", name),
            main_cell("teacher (all-MiniLM-L6-v2)", name),
            main_cell(SHIPPED, name),
            mean(&fid[2]).to_string(),
            margin,
            mean(&fid[4]).to_string(),
        ];
        let got: Vec<String> = row.iter().map(|c| c.replace("**", "")).collect();
        assert_eq!(
            got, expected,
            "README's {name} row is stale against RESULTS.md"
        );
    }
}
