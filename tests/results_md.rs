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
