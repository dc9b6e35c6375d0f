//! Executes one scenario against a fresh server: setup, the steps in order, then teardown.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures::StreamExt;
use jobplane::worker::{JobContext, Worker, WorkerHandle};
use jobplane::{
    CancelOutcome, Client, EventKind, Job, JobEvent, JobState, ListFilter, PoolConfig, QueueConfig,
    RateLimit, WaitMode, WaitOptions,
};
use jobplane_tests::{TestServer, GUARD};
use serde_json::Value as Json;
use tokio::task::JoinHandle;

use crate::behaviour::{self, Shared};
use crate::schema::{self, Dur, Scenario, Step};

/// The wait timeout when a step gives none.
const DEFAULT_WAIT: Duration = Duration::from_secs(20);

/// Runs `scenario` on a server of its own.
pub async fn run(scenario: &Scenario) -> Result<()> {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut runner = Runner {
        client,
        server,
        shared: Arc::new(Shared::default()),
        jobs: HashMap::new(),
        workers: Vec::new(),
        worker_ids: HashMap::new(),
        watches: HashMap::new(),
        background: HashMap::new(),
    };
    let outcome = runner.run(scenario).await;
    runner.teardown().await;
    outcome
}

/// Awaits `f`, failing the step if it takes longer than the guard.
async fn guard<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(GUARD, f)
        .await
        .map_err(|_| anyhow!("timed out after {GUARD:?} waiting for {what}"))
}

struct Runner {
    client: Client,
    server: TestServer,
    shared: Arc<Shared>,
    /// Job names given with `as` → job ids.
    jobs: HashMap<String, String>,
    /// Running workers by name, in start order.
    workers: Vec<(String, WorkerHandle)>,
    /// Every worker's id by name, also after it stopped.
    worker_ids: HashMap<String, String>,
    /// Finished watches by name.
    watches: HashMap<String, Vec<JobEvent>>,
    /// Watches collecting in the background by name.
    background: HashMap<String, JoinHandle<Result<Vec<JobEvent>>>>,
}

/// What an answer carries besides the job snapshot, for `created`, `reached` and `outcome`.
#[derive(Default)]
struct Extras {
    created: Option<bool>,
    reached: Option<bool>,
    outcome: Option<CancelOutcome>,
}

impl Runner {
    async fn run(&mut self, scenario: &Scenario) -> Result<()> {
        self.setup(&scenario.setup).await.context("setup")?;
        for (i, step) in scenario.steps.iter().enumerate() {
            self.step(step)
                .await
                .with_context(|| format!("step {} ({})", i + 1, step.kind()))?;
        }
        Ok(())
    }

    async fn teardown(&mut self) {
        // Let every held handler finish, then stop the workers and the server.
        self.shared.fire_all();
        for (_, task) in self.background.drain() {
            task.abort();
        }
        for (name, worker) in self.workers.drain(..) {
            if let Ok(Err(e)) = guard("worker stop", worker.stop()).await {
                eprintln!("teardown: worker {name} stopped with {e}");
            }
        }
        self.server.stop().await;
    }

    async fn setup(&mut self, setup: &schema::Setup) -> Result<()> {
        for (name, config) in &setup.pools {
            self.client
                .configure_pool(name, pool_config(config))
                .await
                .with_context(|| format!("configure pool {name}"))?;
        }
        for (name, config) in &setup.queues {
            self.client
                .configure_queue(name, queue_config(config))
                .await
                .with_context(|| format!("configure queue {name}"))?;
        }
        Ok(())
    }

    fn client_for(&self, namespace: &Option<String>) -> Client {
        match namespace {
            Some(ns) => self.client.with_namespace(ns),
            None => self.client.clone(),
        }
    }

    fn job_id(&self, name: &str) -> Result<String> {
        self.jobs
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("no job named `{name}` (name jobs with `as`)"))
    }

    /// The id a step is about: `job` (a name) or `id` (literal), exactly one.
    fn target(&self, job: &Option<String>, id: &Option<String>) -> Result<String> {
        match (job, id) {
            (Some(name), None) => self.job_id(name),
            (None, Some(id)) => Ok(id.clone()),
            _ => bail!("give exactly one of `job` and `id`"),
        }
    }

    fn name_job(&mut self, alias: &Option<String>, id: &str) -> Result<()> {
        if let Some(alias) = alias {
            ensure!(
                self.jobs.insert(alias.clone(), id.to_owned()).is_none(),
                "job name `{alias}` is used twice"
            );
        }
        Ok(())
    }

    async fn step(&mut self, step: &Step) -> Result<()> {
        let (expect, expect_error) = match step {
            Step::Submit(s) => (s.expect.is_some(), s.expect_error.is_some()),
            Step::Get(s) => (s.expect.is_some(), s.expect_error.is_some()),
            Step::Wait(s) => (s.expect.is_some(), s.expect_error.is_some()),
            Step::Cancel(s) => (s.expect.is_some(), s.expect_error.is_some()),
            _ => (false, false),
        };
        ensure!(
            !(expect && expect_error),
            "give `expect` or `expect_error`, not both"
        );
        match step {
            Step::StartWorker(s) => self.start_worker(s),
            Step::StopWorker(name) => {
                let i = self
                    .workers
                    .iter()
                    .position(|(n, _)| n == name)
                    .ok_or_else(|| anyhow!("no running worker named `{name}`"))?;
                let (_, worker) = self.workers.remove(i);
                guard("worker stop", worker.stop())
                    .await?
                    .context("worker stop")?;
                Ok(())
            }
            Step::Release(signal) => {
                self.shared.fire(signal);
                Ok(())
            }
            Step::Submit(s) => self.submit(s).await,
            Step::SubmitBatch(s) => self.submit_batch(s).await,
            Step::Get(s) => {
                let id = self.target(&s.job, &s.id)?;
                let answer = guard("get", self.client_for(&s.namespace).get(&id)).await?;
                match expect_outcome(answer, &s.expect_error)? {
                    Some(job) => self.check_job_opt(&job, &s.expect, Extras::default()),
                    None => Ok(()),
                }
            }
            Step::Wait(s) => self.wait(s).await,
            Step::WaitMany(s) => self.wait_many(s).await,
            Step::Cancel(s) => self.cancel(s).await,
            Step::Watch(s) => self.watch(s).await,
            Step::AwaitWatch(s) => {
                let task = self
                    .background
                    .remove(&s.watch)
                    .ok_or_else(|| anyhow!("no background watch named `{}`", s.watch))?;
                let events = guard("background watch", task).await???;
                self.watches.insert(s.watch.clone(), events.clone());
                if let Some(exp) = &s.expect {
                    self.check_watch(&events, exp)?;
                }
                Ok(())
            }
            Step::List(s) => self.list(s).await,
            Step::ConfigureQueue(s) => {
                let answer = guard(
                    "configure queue",
                    self.client
                        .configure_queue(&s.name, queue_config(&s.config)),
                )
                .await?;
                expect_outcome(answer, &s.expect_error).map(|_| ())
            }
            Step::ConfigurePool(s) => {
                let answer = guard(
                    "configure pool",
                    self.client.configure_pool(&s.name, pool_config(&s.config)),
                )
                .await?;
                expect_outcome(answer, &s.expect_error).map(|_| ())
            }
            Step::Queue(s) => {
                let queues = guard("list queues", self.client.list_queues()).await??;
                let q = queues
                    .iter()
                    .find(|q| q.name == s.name)
                    .ok_or_else(|| anyhow!("no queue `{}` in {queues:?}", s.name))?;
                let mut m = Mismatches::default();
                m.eq("depth", s.expect.depth, q.depth);
                m.eq("running", s.expect.running, q.running);
                m.eq("paused", s.expect.paused, q.config.paused);
                m.eq(
                    "max_concurrency",
                    s.expect.max_concurrency,
                    q.config.max_concurrency.unwrap_or(0),
                );
                m.finish(|| format!("{q:?}"))
            }
            Step::Pool(s) => {
                let p = guard("get pool", self.client.get_pool(&s.name)).await??;
                let mut m = Mismatches::default();
                if let Some(want) = &s.expect.in_use {
                    for (unit, n) in want {
                        m.eq(
                            &format!("in_use[{unit}]"),
                            Some(*n),
                            p.in_use.get(unit).copied().unwrap_or(0),
                        );
                    }
                }
                m.eq("running", s.expect.running, p.running);
                m.eq("waiting", s.expect.waiting, p.waiting);
                m.eq("epoch", s.expect.epoch, p.epoch);
                if let Some(least) = s.expect.epoch_at_least {
                    m.check(p.epoch >= least, || {
                        format!("epoch: want at least {least}, got {}", p.epoch)
                    });
                }
                m.finish(|| format!("{p:?}"))
            }
            Step::ExpectOrder(s) => self.expect_order(s),
            Step::ExpectPeak(s) => {
                let peak = self.shared.peak(&s.queue);
                let mut m = Mismatches::default();
                if let Some(most) = s.at_most {
                    m.check(peak <= most, || format!("peak {peak} > at_most {most}"));
                }
                if let Some(least) = s.at_least {
                    m.check(peak >= least, || format!("peak {peak} < at_least {least}"));
                }
                m.finish(|| format!("queue {}", s.queue))
            }
        }
    }

    fn start_worker(&mut self, s: &schema::StartWorker) -> Result<()> {
        ensure!(
            !self.worker_ids.contains_key(&s.name),
            "worker name `{}` is used twice",
            s.name
        );
        ensure!(!s.queues.is_empty(), "a worker needs at least one queue");
        let mut builder = Worker::builder(self.server.addr.as_str())
            .concurrency(s.concurrency)
            .name(s.name.clone())
            .shutdown_timeout(Duration::from_millis(200));
        if let Some(ns) = &s.namespace {
            builder = builder.namespace(ns);
        }
        for queue in &s.queues {
            let shared = self.shared.clone();
            builder = builder.handler(queue, move |ctx: JobContext| {
                behaviour::handle(shared.clone(), ctx)
            });
        }
        let handle = builder.build().context("build worker")?.spawn();
        self.worker_ids
            .insert(s.name.clone(), handle.id().to_owned());
        self.workers.push((s.name.clone(), handle));
        Ok(())
    }

    fn spec(&self, s: &schema::JobSpec) -> Result<jobplane::JobSpec> {
        let mut spec = jobplane::JobSpec::new(&s.queue).priority(s.priority);
        match (&s.payload, s.payload_size) {
            (Some(_), Some(_)) => bail!("give at most one of `payload` and `payload_size`"),
            (Some(p), None) => spec = spec.payload(serde_json::to_vec(p)?),
            (None, Some(n)) => spec = spec.payload(vec![b'x'; n]),
            (None, None) => {}
        }
        if let Some(k) = &s.idempotency_key {
            spec = spec.idempotency_key(k);
        }
        if let Some(d) = s.run_timeout {
            spec = spec.run_timeout(d.0);
        }
        if let Some(d) = s.max_wait {
            spec = spec.max_wait(d.0);
        }
        match (s.retries, &s.retry_policy) {
            (Some(_), Some(_)) => bail!("give at most one of `retries` and `retry_policy`"),
            (Some(n), None) => spec = spec.retries(n),
            (None, Some(p)) => spec = spec.retry_policy(retry_policy(p)),
            (None, None) => {}
        }
        for (k, v) in &s.labels {
            spec = spec.label(k, v);
        }
        for p in &s.pools {
            let mut r = jobplane::PoolRequest::new(&p.pool);
            for (unit, n) in &p.units {
                r = r.units(unit, *n);
            }
            if let Some(d) = p.max_wait {
                r = r.max_wait(d.0);
            }
            spec = spec.pool(r);
        }
        if let Some(ns) = &s.namespace {
            spec = spec.namespace(ns);
        }
        Ok(spec)
    }

    async fn submit(&mut self, s: &schema::JobSpec) -> Result<()> {
        ensure!(
            s.alias.is_none() || s.expect_error.is_none(),
            "a submit expected to fail names no job"
        );
        let spec = self.spec(s)?;
        let answer = guard("submit", self.client.submit(spec)).await?;
        let Some(submitted) = expect_outcome(answer, &s.expect_error)? else {
            return Ok(());
        };
        self.name_job(&s.alias, &submitted.job.id)?;
        self.check_job_opt(
            &submitted.job,
            &s.expect,
            Extras {
                created: Some(submitted.created),
                ..Extras::default()
            },
        )
    }

    async fn submit_batch(&mut self, s: &schema::SubmitBatch) -> Result<()> {
        let mut specs = Vec::new();
        for j in &s.jobs {
            ensure!(
                j.expect_error.is_none(),
                "`expect_error` belongs to the batch, not to one of its jobs"
            );
            specs.push(self.spec(j)?);
        }
        let client = self.client_for(&s.namespace);
        let answer = guard("submit batch", client.submit_batch(specs)).await?;
        let Some(submitted) = expect_outcome(answer, &s.expect_error)? else {
            return Ok(());
        };
        ensure!(
            submitted.len() == s.jobs.len(),
            "{} answers for {} jobs",
            submitted.len(),
            s.jobs.len()
        );
        for (j, sub) in s.jobs.iter().zip(&submitted) {
            self.name_job(&j.alias, &sub.job.id)?;
        }
        for (i, (j, sub)) in s.jobs.iter().zip(&submitted).enumerate() {
            self.check_job_opt(
                &sub.job,
                &j.expect,
                Extras {
                    created: Some(sub.created),
                    ..Extras::default()
                },
            )
            .with_context(|| format!("jobs[{i}]"))?;
        }
        Ok(())
    }

    async fn wait(&mut self, s: &schema::Wait) -> Result<()> {
        let id = self.target(&s.job, &s.id)?;
        let options = WaitOptions::new()
            .timeout(s.timeout.map_or(DEFAULT_WAIT, |d| d.0))
            .until(states(&s.until)?);
        let answer = guard("wait", self.client_for(&s.namespace).wait(&id, options)).await?;
        let Some(w) = expect_outcome(answer, &s.expect_error)? else {
            return Ok(());
        };
        self.handlers_started(&s.until, std::slice::from_ref(&w.job))
            .await?;
        let mut exp = s.expect.clone().unwrap_or_default();
        exp.reached.get_or_insert(true);
        self.check_job(
            &w.job,
            &exp,
            Extras {
                reached: Some(w.reached),
                ..Extras::default()
            },
        )
    }

    /// After a wait for RUNNING: the handlers of the jobs found RUNNING have started too (the
    /// service marks RUNNING when the worker acknowledges, just before the handler begins), so
    /// that what a scenario does next (e.g. release them) finds them in their handlers.
    async fn handlers_started(&self, until: &[String], jobs: &[Job]) -> Result<()> {
        if !until.iter().any(|s| s == "RUNNING") {
            return Ok(());
        }
        let running: Vec<String> = jobs
            .iter()
            .filter(|j| j.state == JobState::Running)
            .map(|j| j.id.clone())
            .collect();
        guard("handlers to start", self.shared.started(&running)).await
    }

    async fn wait_many(&mut self, s: &schema::WaitMany) -> Result<()> {
        let ids = s
            .jobs
            .iter()
            .map(|n| self.job_id(n))
            .collect::<Result<Vec<_>>>()?;
        let mode = match s.mode.as_str() {
            "all" => WaitMode::All,
            "any" => WaitMode::Any,
            other => bail!("mode `{other}`: want `all` or `any`"),
        };
        let options = WaitOptions::new()
            .timeout(s.timeout.map_or(DEFAULT_WAIT, |d| d.0))
            .until(states(&s.until)?);
        let r = guard("wait_many", self.client.wait_many(ids, mode, options)).await??;
        let jobs: Vec<_> = r.results.iter().map(|w| w.job.clone()).collect();
        self.handlers_started(&s.until, &jobs).await?;
        let exp = s.expect.clone().unwrap_or_default();
        let mut m = Mismatches::default();
        m.eq("reached", Some(exp.reached.unwrap_or(true)), r.reached);
        let count = r.results.iter().filter(|w| w.reached).count();
        m.eq("reached_count", exp.reached_count, count);
        m.finish(|| format!("{} results, {count} reached", r.results.len()))?;
        for (name, w) in s.jobs.iter().zip(&r.results) {
            let extras = || Extras {
                reached: Some(w.reached),
                ..Extras::default()
            };
            if let Some(each) = &exp.each {
                self.check_job(&w.job, each, extras())
                    .with_context(|| format!("each: job `{name}`"))?;
            }
            if let Some(e) = exp.jobs.get(name) {
                self.check_job(&w.job, e, extras())
                    .with_context(|| format!("job `{name}`"))?;
            }
        }
        for name in exp.jobs.keys() {
            ensure!(
                s.jobs.contains(name),
                "expect.jobs names `{name}`, not waited for"
            );
        }
        Ok(())
    }

    async fn cancel(&mut self, s: &schema::Cancel) -> Result<()> {
        let id = self.target(&s.job, &s.id)?;
        let client = self.client_for(&s.namespace);
        let reason = s.reason.clone().unwrap_or_default();
        let answer = guard(
            "cancel",
            client.cancel_with_reason(&id, s.grace.map(|d| d.0), &reason),
        )
        .await?;
        let Some(c) = expect_outcome(answer, &s.expect_error)? else {
            return Ok(());
        };
        self.check_job_opt(
            &c.job,
            &s.expect,
            Extras {
                outcome: Some(c.outcome),
                ..Extras::default()
            },
        )
    }

    async fn watch(&mut self, s: &schema::Watch) -> Result<()> {
        let id = self.job_id(&s.job)?;
        let client = self.client.clone();
        let (from, stop_after) = (s.from_seq, s.stop_after.clone());
        if let Some(m) = &stop_after {
            ensure!(
                m.state.is_some()
                    || m.progress.is_some()
                    || m.error.is_some()
                    || m.output_contains.is_some(),
                "stop_after matches nothing"
            );
        }
        let collect = async move {
            let events = guard("watch", collect(&client, &id, from, stop_after.as_ref())).await??;
            check_invariants(&events, from, stop_after.is_none())?;
            Ok(events)
        };
        if s.background {
            let name = s
                .alias
                .clone()
                .ok_or_else(|| anyhow!("a background watch needs `as`"))?;
            ensure!(
                s.expect.is_none(),
                "a background watch is checked by `await_watch`"
            );
            ensure!(
                !self.background.contains_key(&name) && !self.watches.contains_key(&name),
                "watch name `{name}` is used twice"
            );
            self.background.insert(name, tokio::spawn(collect));
            return Ok(());
        }
        let events = collect.await?;
        if let Some(name) = &s.alias {
            ensure!(
                self.watches.insert(name.clone(), events.clone()).is_none(),
                "watch name `{name}` is used twice"
            );
        }
        if let Some(exp) = &s.expect {
            self.check_watch(&events, exp)?;
        }
        Ok(())
    }

    fn check_watch(&self, events: &[JobEvent], exp: &schema::WatchExpect) -> Result<()> {
        let mut m = Mismatches::default();
        let state_events = || {
            events.iter().filter_map(|e| match &e.kind {
                EventKind::State { to, error, .. } => Some((*to, error.clone())),
                _ => None,
            })
        };
        if let Some(want) = &exp.states {
            let want = states(want)?;
            let got: Vec<JobState> = state_events().map(|(to, _)| to).collect();
            m.eq("states", Some(want), got);
        }
        if let Some(want) = &exp.errors {
            let got: Vec<String> = state_events()
                .filter_map(|(_, e)| e.map(|e| e.reason))
                .collect();
            m.eq("errors", Some(want.clone()), got);
        }
        if let Some(want) = &exp.progress {
            let got: Vec<f64> = events
                .iter()
                .filter_map(|e| match &e.kind {
                    EventKind::Progress { percent, .. } => Some(*percent),
                    _ => None,
                })
                .collect();
            m.eq("progress", Some(want.clone()), got);
        }
        let output = || -> String {
            events
                .iter()
                .filter_map(|e| match &e.kind {
                    EventKind::Output { data, .. } => Some(String::from_utf8_lossy(data)),
                    _ => None,
                })
                .collect()
        };
        if let Some(want) = &exp.output {
            m.eq("output", Some(want.clone()), output());
        }
        if let Some(n) = exp.output_lines {
            let want: String = (0..n).map(|i| format!("line {i}\n")).collect();
            let got = output();
            m.check(got == want, || {
                format!(
                    "output_lines: want {n} lines, got {} bytes ending {:?}",
                    got.len(),
                    &got[got.len().saturating_sub(40)..]
                )
            });
        }
        if let Some(want) = &exp.kinds {
            let got: Vec<&str> = events.iter().map(|e| kind_name(&e.kind)).collect();
            m.eq(
                "kinds",
                Some(want.clone()),
                got.iter().map(|s| s.to_string()).collect(),
            );
        }
        m.eq("count", exp.count, events.len());
        m.eq(
            "first_seq",
            exp.first_seq,
            events.first().map_or(0, |e| e.seq),
        );
        if let Some(want) = &exp.terminal {
            let want = state(want)?;
            let got = events.last().and_then(|e| match &e.kind {
                EventKind::State { to, .. } => Some(*to),
                _ => None,
            });
            m.eq("terminal", Some(Some(want)), got);
        }
        if let Some(same) = &exp.same_as {
            let other = self
                .watches
                .get(&same.watch)
                .ok_or_else(|| anyhow!("no finished watch named `{}`", same.watch))?;
            let want: Vec<&JobEvent> = other.iter().filter(|e| e.seq > same.after_seq).collect();
            let got: Vec<&JobEvent> = events.iter().collect();
            m.check(want == got, || {
                format!(
                    "same_as {} after seq {}: want seqs {:?}, got {:?}",
                    same.watch,
                    same.after_seq,
                    want.iter().map(|e| e.seq).collect::<Vec<_>>(),
                    got.iter().map(|e| e.seq).collect::<Vec<_>>()
                )
            });
        }
        m.finish(|| summarize_events(events))
    }

    async fn list(&mut self, s: &schema::List) -> Result<()> {
        let mut filter = ListFilter::new().page_size(1000).states(states(&s.states)?);
        if let Some(q) = &s.queue {
            filter = filter.queue(q);
        }
        for (k, v) in &s.labels {
            filter = filter.label(k, v);
        }
        let page = guard("list", self.client_for(&s.namespace).list(filter)).await??;
        let mut m = Mismatches::default();
        m.eq("count", s.expect.count, page.jobs.len());
        if let Some(names) = &s.expect.jobs {
            let want = names
                .iter()
                .map(|n| self.job_id(n))
                .collect::<Result<BTreeSet<_>>>()?;
            let got: BTreeSet<String> = page.jobs.iter().map(|j| j.id.clone()).collect();
            m.eq("jobs", Some(want), got);
        }
        m.finish(|| format!("{} jobs", page.jobs.len()))
    }

    fn expect_order(&self, s: &schema::ExpectOrder) -> Result<()> {
        let starts = self.shared.starts();
        let mut last: Option<(usize, &str)> = None;
        for name in &s.started {
            let id = self.job_id(name)?;
            let at = starts
                .iter()
                .position(|st| st.job_id == id)
                .ok_or_else(|| anyhow!("job `{name}` never started"))?;
            if let Some((before, prev)) = last {
                ensure!(
                    before < at,
                    "job `{prev}` should have started before `{name}` (start positions {before} and {at})"
                );
            }
            last = Some((at, name));
        }
        Ok(())
    }

    fn check_job_opt(&self, job: &Job, exp: &Option<schema::JobExpect>, x: Extras) -> Result<()> {
        match exp {
            Some(exp) => self.check_job(job, exp, x),
            None => Ok(()),
        }
    }

    fn check_job(&self, job: &Job, exp: &schema::JobExpect, x: Extras) -> Result<()> {
        let mut m = Mismatches::default();
        for (field, given, applies) in [
            ("created", exp.created.is_some(), x.created.is_some()),
            ("reached", exp.reached.is_some(), x.reached.is_some()),
            ("outcome", exp.outcome.is_some(), x.outcome.is_some()),
        ] {
            ensure!(
                !given || applies,
                "`{field}` does not apply to this step's answer"
            );
        }
        m.eq("created", exp.created, x.created.unwrap_or_default());
        m.eq("reached", exp.reached, x.reached.unwrap_or_default());
        m.eq(
            "outcome",
            exp.outcome.clone(),
            x.outcome.map(|o| o.as_str().to_owned()).unwrap_or_default(),
        );
        if let Some(name) = &exp.same_job_as {
            m.eq("same_job_as", Some(self.job_id(name)?), job.id.clone());
        }
        if let Some(s) = &exp.state {
            m.eq("state", Some(state(s)?), job.state);
        }
        if let Some(list) = &exp.state_in {
            let list = states(list)?;
            m.check(list.contains(&job.state), || {
                format!("state_in: {} is not one of {list:?}", job.state)
            });
        }
        m.eq("queue", exp.queue.clone(), job.queue.clone());
        m.eq("priority", exp.priority, job.priority);
        if let Some(want) = &exp.result {
            let got: Option<Json> = job
                .result
                .as_ref()
                .and_then(|r| serde_json::from_slice(r).ok());
            m.eq("result", Some(Some(want.clone())), got);
        }
        let has_result = job.result.as_ref().is_some_and(|r| !r.is_empty());
        m.eq("has_result", exp.has_result, has_result);
        let (reason, message) = job
            .error
            .as_ref()
            .map(|e| (e.reason.clone(), e.message.clone()))
            .unzip();
        m.eq("has_error", exp.has_error, job.error.is_some());
        if let Some(want) = &exp.error_reason {
            m.eq("error_reason", Some(Some(want.clone())), reason.clone());
        }
        if let Some(part) = &exp.error_message_contains {
            m.check(message.as_deref().is_some_and(|t| t.contains(part)), || {
                format!("error_message_contains: {part:?} not in {message:?}")
            });
        }
        m.eq("attempt", exp.attempt, job.attempt);
        if let Some(least) = exp.attempt_at_least {
            m.check(job.attempt >= least, || {
                format!("attempt_at_least: want {least}, got {}", job.attempt)
            });
        }
        m.eq("retries_used", exp.retries_used, job.retries_used);
        if let Some(want) = &exp.pool {
            m.eq("pool", Some(Some(want.clone())), job.pool.clone());
        }
        if let Some(want) = &exp.waiting_for {
            m.eq(
                "waiting_for",
                Some(Some(want.clone())),
                job.waiting_for.clone(),
            );
        }
        if let Some(part) = &exp.waiting_for_contains {
            m.check(
                job.waiting_for.as_deref().is_some_and(|w| w.contains(part)),
                || {
                    format!(
                        "waiting_for_contains: {part:?} not in {:?}",
                        job.waiting_for
                    )
                },
            );
        }
        m.eq("progress", exp.progress, job.progress);
        m.eq(
            "cancel_requested",
            exp.cancel_requested,
            job.cancel_requested,
        );
        if let Some(name) = &exp.worker {
            let id = self
                .worker_ids
                .get(name)
                .ok_or_else(|| anyhow!("no worker named `{name}`"))?;
            m.eq("worker", Some(Some(id.clone())), job.worker_id.clone());
        }
        if let Some(want) = exp.handler_starts {
            let got = self
                .shared
                .starts()
                .iter()
                .filter(|s| s.job_id == job.id)
                .count();
            m.eq("handler_starts", Some(want), got);
        }
        if let Some(Dur(least)) = exp.queued_for_at_least {
            let queued = queued_for(job);
            m.check(queued.is_some_and(|q| q >= least), || {
                format!("queued_for_at_least: want {least:?}, got {queued:?}")
            });
        }
        m.finish(|| summarize_job(job))
    }
}

/// How long the job waited: from its creation to its (last) start, or to its end if it never
/// started.
fn queued_for(job: &Job) -> Option<Duration> {
    let created: SystemTime = job.created_at?;
    let until = job.started_at.or(job.finished_at)?;
    until.duration_since(created).ok()
}

/// Collects a job's events from `from` until the stream ends, or until an event matches
/// `stop_after`.
async fn collect(
    client: &Client,
    id: &str,
    from: u64,
    stop_after: Option<&schema::EventMatch>,
) -> Result<Vec<JobEvent>> {
    let mut stream = client.watch(id, from);
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        let event = event.context("watch stream")?;
        let stop = stop_after.is_some_and(|m| matches(m, &event));
        events.push(event);
        if stop {
            return Ok(events);
        }
    }
    ensure!(
        stop_after.is_none(),
        "the stream ended before an event matching stop_after: {}",
        summarize_events(&events)
    );
    Ok(events)
}

fn matches(m: &schema::EventMatch, e: &JobEvent) -> bool {
    let state_ok = m
        .state
        .as_ref()
        .is_none_or(|want| matches!(&e.kind, EventKind::State { to, .. } if to.as_str() == want));
    let progress_ok = m.progress.is_none_or(
        |want| matches!(&e.kind, EventKind::Progress { percent, .. } if *percent == want),
    );
    let error_ok = m.error.as_ref().is_none_or(
        |want| matches!(&e.kind, EventKind::State { error: Some(err), .. } if &err.reason == want),
    );
    let output_ok = m.output_contains.as_ref().is_none_or(|want| {
        matches!(&e.kind, EventKind::Output { data, .. } if String::from_utf8_lossy(data).contains(want.as_str()))
    });
    state_ok && progress_ok && error_ok && output_ok
}

/// What every watch must show: sequence numbers from `from + 1` without gaps, at most one
/// terminal event and nothing after it, and (for a watch read to its end) a terminal event last.
fn check_invariants(events: &[JobEvent], from: u64, complete: bool) -> Result<()> {
    for (i, e) in events.iter().enumerate() {
        ensure!(
            e.seq == from + 1 + i as u64,
            "event {i} has seq {}, want {} (gap or duplicate): {}",
            e.seq,
            from + 1 + i as u64,
            summarize_events(events)
        );
        ensure!(
            !e.is_terminal() || i + 1 == events.len(),
            "an event follows the terminal event: {}",
            summarize_events(events)
        );
    }
    if complete {
        if let Some(last) = events.last() {
            ensure!(
                last.is_terminal(),
                "the stream ended on a non-terminal event: {}",
                summarize_events(events)
            );
        }
    }
    Ok(())
}

/// Fails with `expect_error`'s mismatch, or turns the answer into `Some` when no error was
/// expected and the call succeeded.
fn expect_outcome<T>(
    answer: jobplane::Result<T>,
    expect_error: &Option<schema::ErrorExpect>,
) -> Result<Option<T>> {
    match (answer, expect_error) {
        (Ok(t), None) => Ok(Some(t)),
        (Err(e), None) => Err(anyhow!(e).context("the call failed")),
        (Ok(_), Some(exp)) => bail!("the call succeeded, but {} was expected", exp.code),
        (Err(e), Some(exp)) => {
            check_error(&e, exp)?;
            Ok(None)
        }
    }
}

fn check_error(e: &jobplane::Error, exp: &schema::ErrorExpect) -> Result<()> {
    let mut m = Mismatches::default();
    m.eq(
        "code",
        Some(exp.code.clone()),
        e.code().map_or("(none)", code_name).to_owned(),
    );
    if let Some(reason) = &exp.reason {
        m.eq("reason", Some(Some(reason.as_str())), e.reason());
    }
    if let Some(field) = &exp.field {
        m.eq("field", Some(Some(field.as_str())), e.field());
    }
    if let Some(part) = &exp.message_contains {
        let text = e.to_string();
        m.check(text.contains(part.as_str()), || {
            format!("message_contains: {part:?} not in {text:?}")
        });
    }
    m.eq("retry_after", exp.retry_after, e.retry_after().is_some());
    m.finish(|| format!("{e:?}"))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn state(s: &str) -> Result<JobState> {
    // Scenarios spell states exactly as the API does.
    ensure!(
        JobState::ALL.iter().any(|st| st.as_str() == s),
        "unknown state `{s}`; want one of {:?}",
        JobState::ALL.map(JobState::as_str)
    );
    Ok(JobState::from_str(s)?)
}

fn states(list: &[String]) -> Result<Vec<JobState>> {
    list.iter().map(|s| state(s)).collect()
}

fn kind_name(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::State { .. } => "state",
        EventKind::Progress { .. } => "progress",
        EventKind::Output { .. } => "output",
        _ => "other",
    }
}

fn summarize_job(job: &Job) -> String {
    format!(
        "job {} state={} attempt={} retries_used={} error={:?} waiting_for={:?} pool={:?} result={:?}",
        job.id,
        job.state,
        job.attempt,
        job.retries_used,
        job.error.as_ref().map(|e| e.to_string()),
        job.waiting_for,
        job.pool,
        job.result.as_ref().map(|r| String::from_utf8_lossy(r).into_owned()),
    )
}

fn summarize_events(events: &[JobEvent]) -> String {
    let parts: Vec<String> = events
        .iter()
        .map(|e| match &e.kind {
            EventKind::State { to, error, .. } => match error {
                Some(err) => format!("{}:{to}({})", e.seq, err.reason),
                None => format!("{}:{to}", e.seq),
            },
            EventKind::Progress { percent, .. } => format!("{}:progress {percent}", e.seq),
            EventKind::Output { data, .. } => format!("{}:output {}B", e.seq, data.len()),
            _ => format!("{}:other", e.seq),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Collects every mismatch of one check, so a failure shows them all at once.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, want: Option<T>, got: T) {
        if let Some(want) = want {
            if want != got {
                self.0.push(format!("{what}: want {want:?}, got {got:?}"));
            }
        }
    }

    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }

    fn finish(self, context: impl FnOnce() -> String) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            bail!("{}\n  in: {}", self.0.join("\n  "), context())
        }
    }
}

fn retry_policy(p: &schema::RetryPolicy) -> jobplane::RetryPolicy {
    let mut r = jobplane::RetryPolicy::new(p.max_retries);
    if let Some(d) = p.initial_backoff {
        r = r.initial_backoff(d.0);
    }
    if let Some(d) = p.max_backoff {
        r = r.max_backoff(d.0);
    }
    if let Some(m) = p.multiplier {
        r = r.multiplier(m);
    }
    r
}

fn queue_config(q: &schema::QueueSettings) -> QueueConfig {
    QueueConfig {
        max_concurrency: q.max_concurrency,
        default_run_timeout: q.default_run_timeout.map(|d| d.0),
        default_retry_policy: q.default_retry_policy.as_ref().map(retry_policy),
        max_depth: q.max_depth,
        paused: q.paused,
        default_max_wait: q.default_max_wait.map(|d| d.0),
        ..QueueConfig::default()
    }
}

fn pool_config(p: &schema::PoolSettings) -> PoolConfig {
    let mut config = PoolConfig::new();
    for (unit, n) in &p.max_units {
        config = config.max_units(unit, *n);
    }
    for r in &p.rates {
        let mut rate = RateLimit::new(&r.unit, r.amount, r.per.0);
        if let Some(b) = r.burst {
            rate = rate.burst(b);
        }
        config = config.rate(rate);
    }
    config
}
