//! Issue 16: the README's kernel table is the kernel matrix's committed
//! results (`scripts/kernels.sh --out docs/kernels`), not a copy that can
//! drift from them.

use std::path::PathBuf;

fn repo_file(path: &str) -> String {
    let at = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&at).unwrap_or_else(|e| panic!("{}: {e}", at.display()))
}

/// The table rows of a Markdown text (lines starting with `|`).
fn table(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with('|')).collect()
}

#[test]
fn the_readmes_kernel_table_is_the_matrixs_committed_results() {
    let readme = repo_file("README.md");
    let block = readme
        .split_once("<!-- kernel-matrix:begin -->")
        .and_then(|(_, rest)| rest.split_once("<!-- kernel-matrix:end -->"))
        .map(|(block, _)| block)
        .expect("README has the kernel-matrix markers");
    let results = repo_file("docs/kernels/results.md");
    let rows = table(&results);
    assert!(
        rows.len() >= 5,
        "the results have a row per kernel: {results}"
    );
    assert_eq!(
        table(block),
        rows,
        "README's table differs from docs/kernels/results.md"
    );
    for kernel in ["(bullseye)", "(bookworm)", "(trixie)"] {
        assert!(
            rows.iter().any(|row| row.contains(kernel)),
            "no {kernel} row: {results}"
        );
    }
    // Every kernel either passes or refuses at start; none half works.
    for row in &rows[2..] {
        assert!(
            !row.contains("FAIL") && !row.contains("did not run") && !row.contains("PINNED"),
            "{row}"
        );
    }
    // From 5.15 the datapath loads whole: the daemon starts and every suite
    // passes there; below, it refuses, naming a program.
    for (kernel, starts) in [
        ("(bullseye)", false),
        ("(bookworm)", true),
        ("(trixie)", true),
    ] {
        let row = rows.iter().find(|row| row.contains(kernel)).unwrap();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        if starts {
            assert_eq!(cells[3], "starts", "{row}");
            assert!(
                cells[4..cells.len() - 1]
                    .iter()
                    .all(|c| c.starts_with("pass (")),
                "{row}"
            );
        } else {
            assert!(cells[3].starts_with("refuses: `"), "{row}");
        }
    }
}
