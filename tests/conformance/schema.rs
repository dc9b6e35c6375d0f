//! The scenario schema, as documented in `tests/conformance/README.md`. Every struct refuses
//! unknown fields, so a typo in a scenario is an error rather than a silently skipped check.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_json::Value as Json;

/// One scenario file: a list of scenarios.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub scenarios: Vec<Scenario>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[allow(dead_code)]
    pub description: String,
    #[serde(default)]
    pub setup: Setup,
    #[serde(with = "serde_yaml_ng::with::singleton_map_recursive")]
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    #[serde(default)]
    pub queues: BTreeMap<String, QueueSettings>,
    #[serde(default)]
    pub pools: BTreeMap<String, PoolSettings>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub max_concurrency: Option<u32>,
    pub default_run_timeout: Option<Dur>,
    pub default_retry_policy: Option<RetryPolicy>,
    pub default_max_wait: Option<Dur>,
    pub max_depth: Option<u64>,
    #[serde(default)]
    pub paused: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    #[serde(default)]
    pub max_units: BTreeMap<String, u64>,
    #[serde(default)]
    pub rates: Vec<Rate>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub unit: String,
    pub amount: u64,
    pub per: Dur,
    pub burst: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub initial_backoff: Option<Dur>,
    pub max_backoff: Option<Dur>,
    pub multiplier: Option<f64>,
}

/// One step: a map with exactly one key, the step's kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    StartWorker(StartWorker),
    StopWorker(String),
    Release(String),
    Submit(JobSpec),
    SubmitBatch(SubmitBatch),
    Get(Get),
    Wait(Wait),
    WaitMany(WaitMany),
    Cancel(Cancel),
    Watch(Watch),
    AwaitWatch(AwaitWatch),
    List(List),
    ConfigureQueue(ConfigureQueue),
    ConfigurePool(ConfigurePool),
    Queue(QueueCheck),
    Pool(PoolCheck),
    ExpectOrder(ExpectOrder),
    ExpectPeak(ExpectPeak),
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Step::StartWorker(_) => "start_worker",
            Step::StopWorker(_) => "stop_worker",
            Step::Release(_) => "release",
            Step::Submit(_) => "submit",
            Step::SubmitBatch(_) => "submit_batch",
            Step::Get(_) => "get",
            Step::Wait(_) => "wait",
            Step::WaitMany(_) => "wait_many",
            Step::Cancel(_) => "cancel",
            Step::Watch(_) => "watch",
            Step::AwaitWatch(_) => "await_watch",
            Step::List(_) => "list",
            Step::ConfigureQueue(_) => "configure_queue",
            Step::ConfigurePool(_) => "configure_pool",
            Step::Queue(_) => "queue",
            Step::Pool(_) => "pool",
            Step::ExpectOrder(_) => "expect_order",
            Step::ExpectPeak(_) => "expect_peak",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartWorker {
    #[serde(default = "default_worker_name")]
    pub name: String,
    pub queues: Vec<String>,
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    pub namespace: Option<String>,
}

fn default_worker_name() -> String {
    "worker".into()
}

fn default_concurrency() -> u32 {
    4
}

/// A job spec as written in `submit` and in `submit_batch.jobs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub queue: String,
    #[serde(rename = "as")]
    pub alias: Option<String>,
    pub payload: Option<Json>,
    pub payload_size: Option<usize>,
    #[serde(default)]
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub run_timeout: Option<Dur>,
    pub max_wait: Option<Dur>,
    pub retries: Option<u32>,
    pub retry_policy: Option<RetryPolicy>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pools: Vec<PoolRequest>,
    pub namespace: Option<String>,
    pub expect: Option<JobExpect>,
    /// Only in a `submit` step: the submit must fail like this.
    pub expect_error: Option<ErrorExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRequest {
    pub pool: String,
    #[serde(default)]
    pub units: BTreeMap<String, u64>,
    pub max_wait: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBatch {
    pub jobs: Vec<JobSpec>,
    pub namespace: Option<String>,
    pub expect_error: Option<ErrorExpect>,
}

/// Which job a step is about: a name given with `as`, or a literal id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Get {
    pub job: Option<String>,
    pub id: Option<String>,
    pub namespace: Option<String>,
    pub expect: Option<JobExpect>,
    pub expect_error: Option<ErrorExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wait {
    pub job: Option<String>,
    pub id: Option<String>,
    #[serde(default)]
    pub until: Vec<String>,
    pub timeout: Option<Dur>,
    pub namespace: Option<String>,
    pub expect: Option<JobExpect>,
    pub expect_error: Option<ErrorExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitMany {
    pub jobs: Vec<String>,
    pub mode: String,
    #[serde(default)]
    pub until: Vec<String>,
    pub timeout: Option<Dur>,
    pub expect: Option<WaitManyExpect>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitManyExpect {
    pub reached: Option<bool>,
    pub reached_count: Option<usize>,
    pub each: Option<JobExpect>,
    #[serde(default)]
    pub jobs: BTreeMap<String, JobExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    pub job: Option<String>,
    pub id: Option<String>,
    pub grace: Option<Dur>,
    pub reason: Option<String>,
    pub namespace: Option<String>,
    pub expect: Option<JobExpect>,
    pub expect_error: Option<ErrorExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    pub job: String,
    #[serde(default)]
    pub from_seq: u64,
    pub stop_after: Option<EventMatch>,
    #[serde(rename = "as")]
    pub alias: Option<String>,
    #[serde(default)]
    pub background: bool,
    pub expect: Option<WatchExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwaitWatch {
    pub watch: String,
    pub expect: Option<WatchExpect>,
}

/// Ends a watch at the first event that matches every field given.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventMatch {
    pub state: Option<String>,
    pub progress: Option<f64>,
    pub error: Option<String>,
    pub output_contains: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchExpect {
    pub states: Option<Vec<String>>,
    pub progress: Option<Vec<f64>>,
    pub output: Option<String>,
    pub output_lines: Option<usize>,
    pub errors: Option<Vec<String>>,
    pub kinds: Option<Vec<String>>,
    pub count: Option<usize>,
    pub terminal: Option<String>,
    pub first_seq: Option<u64>,
    pub same_as: Option<SameAs>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SameAs {
    pub watch: String,
    #[serde(default)]
    pub after_seq: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct List {
    pub queue: Option<String>,
    #[serde(default)]
    pub states: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub namespace: Option<String>,
    pub expect: ListExpect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListExpect {
    pub count: Option<usize>,
    pub jobs: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigureQueue {
    pub name: String,
    #[serde(default)]
    pub config: QueueSettings,
    pub expect_error: Option<ErrorExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigurePool {
    pub name: String,
    #[serde(default)]
    pub config: PoolSettings,
    pub expect_error: Option<ErrorExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueCheck {
    pub name: String,
    pub expect: QueueExpect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueExpect {
    pub depth: Option<u64>,
    pub running: Option<u64>,
    pub paused: Option<bool>,
    pub max_concurrency: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolCheck {
    pub name: String,
    pub expect: PoolExpect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolExpect {
    pub in_use: Option<BTreeMap<String, u64>>,
    pub running: Option<u64>,
    pub waiting: Option<u64>,
    pub epoch: Option<u64>,
    pub epoch_at_least: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectOrder {
    pub started: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectPeak {
    pub queue: String,
    pub at_most: Option<usize>,
    pub at_least: Option<usize>,
}

/// What a job snapshot must look like. `created`, `reached` and `outcome` only apply to the
/// steps whose answer carries them (submit, wait and wait_many, cancel).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobExpect {
    pub created: Option<bool>,
    pub reached: Option<bool>,
    pub outcome: Option<String>,
    pub same_job_as: Option<String>,
    pub state: Option<String>,
    pub state_in: Option<Vec<String>>,
    pub queue: Option<String>,
    pub priority: Option<i32>,
    pub result: Option<Json>,
    pub has_result: Option<bool>,
    pub error_reason: Option<String>,
    pub error_message_contains: Option<String>,
    pub has_error: Option<bool>,
    pub attempt: Option<u32>,
    pub attempt_at_least: Option<u32>,
    pub retries_used: Option<u32>,
    pub pool: Option<String>,
    pub waiting_for: Option<String>,
    pub waiting_for_contains: Option<String>,
    pub progress: Option<f64>,
    pub cancel_requested: Option<bool>,
    pub worker: Option<String>,
    pub handler_starts: Option<usize>,
    pub queued_for_at_least: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorExpect {
    pub code: String,
    pub reason: Option<String>,
    pub field: Option<String>,
    pub message_contains: Option<String>,
    pub retry_after: Option<bool>,
}

/// A duration written as `<integer><unit>`, unit one of `ms`, `s`, `m`, `h`: `0s`, `150ms`, `2s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Dur, String> {
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration `{s}` has no unit (ms, s, m, h)"))?;
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("duration `{s}` does not start with an integer"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => {
                return Err(format!(
                    "duration `{s}`: unknown unit `{unit}` (ms, s, m, h)"
                ))
            }
        };
        Ok(Dur(d))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Loads every `*.yaml` file of `dir`, sorted by name: (file stem, parsed file or error).
pub fn load_dir(dir: &Path) -> Vec<(String, Result<File, String>)> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let stem = p.file_stem().expect("stem").to_string_lossy().into_owned();
            let parsed = std::fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    serde_yaml_ng::from_str::<File>(&text).map_err(|e| format!("{e}"))
                });
            (stem, parsed)
        })
        .collect()
}
