//! The Rust driver of the conformance corpus (`tests/conformance/README.md`): one test per
//! scenario of `scenarios/*.yaml`, each against a real server of its own on `127.0.0.1:0` with a
//! fresh database, driven through the Rust SDK. The database is SQLite, or PostgreSQL with
//! `JOBPLANE_TEST_BACKEND=postgres` (`jobplane_tests::backend`).
//!
//! Scenarios listed in `known-failing-rust.txt` still run: their failure is expected and
//! reported as a pass, and their passing fails the run, so the list cannot go stale.

mod behaviour;
mod run;
mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};

/// Bounds a whole scenario, on top of the guard of each step.
const SCENARIO_GUARD: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// Scenario names listed in a known-failing file (`#` starts a comment).
fn known_failing(path: &Path) -> Vec<String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn run_scenario(scenario: &schema::Scenario) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        match tokio::time::timeout(SCENARIO_GUARD, run::run(scenario)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("the scenario took longer than {SCENARIO_GUARD:?}")),
        }
    })
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let root = root();
    let known = known_failing(&root.join("known-failing-rust.txt"));
    let mut trials = Vec::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut problems: Vec<String> = Vec::new();

    for (file, parsed) in schema::load_dir(&root.join("scenarios")) {
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => {
                trials.push(Trial::test(format!("{file}::parse"), move || {
                    Err(Failed::from(format!("scenarios/{file}.yaml: {e}")))
                }));
                continue;
            }
        };
        for scenario in parsed.scenarios {
            if let Some(other) = names.insert(scenario.name.clone(), file.clone()) {
                problems.push(format!(
                    "scenario `{}` is in both {other}.yaml and {file}.yaml",
                    scenario.name
                ));
                continue;
            }
            let expected_failure = known.contains(&scenario.name);
            let name = format!("{file}::{}", scenario.name);
            trials.push(Trial::test(name, move || {
                match (run_scenario(&scenario), expected_failure) {
                    (Ok(()), false) => Ok(()),
                    (Err(e), false) => Err(e.into()),
                    (Err(e), true) => {
                        eprintln!("expected failure (known-failing-rust.txt): {e}");
                        Ok(())
                    }
                    (Ok(()), true) => Err(format!(
                        "`{}` is listed in known-failing-rust.txt but passes: remove it",
                        scenario.name
                    )
                    .into()),
                }
            }));
        }
    }

    let mut seen = BTreeSet::new();
    for k in &known {
        if !names.contains_key(k) {
            problems.push(format!(
                "known-failing-rust.txt names `{k}`, which is no scenario"
            ));
        }
        if !seen.insert(k) {
            problems.push(format!("known-failing-rust.txt names `{k}` twice"));
        }
    }
    trials.push(Trial::test("corpus::consistent", move || {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n").into())
        }
    }));

    libtest_mimic::run(&args, trials).exit_code()
}
