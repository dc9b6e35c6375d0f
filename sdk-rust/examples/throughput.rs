//! Prints how fast one SDK worker drains a queue of no-op jobs.
//!
//! ```text
//! jobplane serve &
//! cargo run --release -p jobplane --example throughput -- [ADDR] [JOBS] [CONCURRENCY]
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobplane::worker::{HandlerError, JobContext, Worker};
use jobplane::{Client, JobSpec, JobState, WaitMode};
use tokio::sync::Notify;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .unwrap_or_else(|| jobplane::DEFAULT_ADDR.to_owned());
    let jobs: usize = args.next().map_or(Ok(20_000), |s| s.parse())?;
    let concurrency: u32 = args.next().map_or(Ok(256), |s| s.parse())?;
    let queue = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let client = Client::connect(addr).await?;

    let submit_start = Instant::now();
    let mut ids = Vec::with_capacity(jobs);
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(1000) {
        let specs = chunk
            .iter()
            .map(|i| JobSpec::new(queue.clone()).payload(i.to_string()))
            .collect();
        ids.extend(
            client
                .submit_batch(specs)
                .await?
                .into_iter()
                .map(|s| s.job.id),
        );
    }
    let submit_time = submit_start.elapsed();
    println!(
        "submitted {jobs} jobs in {submit_time:.2?} ({:.0} jobs/s)",
        jobs as f64 / submit_time.as_secs_f64()
    );

    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let (d, n) = (done.clone(), all_done.clone());
    let worker = Worker::builder(&client)
        .concurrency(concurrency)
        .handler(queue.clone(), move |ctx: JobContext| {
            let (d, n) = (d.clone(), n.clone());
            async move {
                if d.fetch_add(1, Ordering::Relaxed) + 1 == jobs {
                    n.notify_one();
                }
                Ok::<_, HandlerError>(ctx.payload().to_vec())
            }
        })
        .build()?;
    let run_start = Instant::now();
    let handle = worker.spawn();
    all_done.notified().await;
    let handled = run_start.elapsed();
    // Every outcome committed: wait for the jobs to be terminal.
    for chunk in ids.chunks(10_000) {
        let r = client
            .wait_many(
                chunk.iter().cloned(),
                WaitMode::All,
                Duration::from_secs(60),
            )
            .await?;
        anyhow::ensure!(r.reached, "jobs did not finish");
        anyhow::ensure!(
            r.results.iter().all(|w| w.job.state == JobState::Succeeded),
            "some jobs did not succeed"
        );
    }
    let committed = run_start.elapsed();
    println!(
        "ran {jobs} jobs with concurrency {concurrency}: handlers done in {handled:.2?}, all \
         committed in {committed:.2?} ({:.0} jobs/s)",
        jobs as f64 / committed.as_secs_f64()
    );
    handle.stop().await?;
    Ok(())
}
