//! Several scheduler nodes sharing one [`SharedScheduleStore`] (PostgreSQL).
//!
//! In this mode a node keeps no entries in memory. Four background loops do the work:
//!
//! - the **poller** reserves due entries through the store's next-run index
//!   (`FOR UPDATE SKIP LOCKED`, so nodes never wait for each other), plans each firing with the
//!   same rules as one node (misfire, cron, `max_executions`), and claims the runs in one
//!   transaction per batch: the unique `(entry, due time)` key means each occurrence is claimed
//!   by exactly one node. It sleeps until the
//!   next known due time or the poll interval, whichever comes first, and wakes at once when
//!   this node schedules or resumes an entry;
//! - the **taker-over** takes, every poll interval, runs whose lease expired (their owner
//!   died or stalled) and runs them again here with the same idempotency key;
//! - the **renewer** extends the leases of this node's runs every `lease / 3`;
//! - the **finisher** records ended runs in batches, each applied to its entry under the
//!   entry's row lock; a run another node took over meanwhile is left to that node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use architectlm_core::extensions::scheduler::{
    MisfireReason, MisfireRecord, OverlapPolicy, RunRecord, ScheduledTaskStatus, SchedulerEventType,
};
use architectlm_core::{Error, ExecuteOptions, Result, TaskOrigin, TaskRef};
use architectlm_store::schedule::{
    Claim, DueEntry, RunState, ScheduleEntry, ScheduleRun, SharedScheduleStore, truncate_ms,
};
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::TaskScheduler;

/// How a node takes part in a cluster of schedulers sharing one store.
///
/// ```
/// use std::time::Duration;
/// use architectlm_scheduler::ClusterOptions;
///
/// let opts = ClusterOptions::new("host-a/7f3e")
///     .lease(Duration::from_secs(10))
///     .poll_interval(Duration::from_millis(100));
/// assert_eq!(opts.lease, Duration::from_secs(10));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// This node's id, unique per running process (e.g. `"{hostname}/{uuid}"`), so that a
    /// restarted node does not mistake its predecessor's claims for its own.
    pub node_id: String,
    /// How long a claimed run stays this node's without a renewal (default 30 s). A node that
    /// dies has its runs started elsewhere about this long after its last renewal.
    pub lease: Duration,
    /// Longest pause between two looks for due entries scheduled by other nodes (default
    /// 200 ms). Entries this node knows are due sooner are picked up on time.
    pub poll_interval: Duration,
    /// Most entries reserved, claimed or finished in one transaction (default 512).
    pub batch_size: usize,
    /// Most runs executing on this node at once (default 4096).
    pub max_in_flight: usize,
}

impl ClusterOptions {
    /// Options for the node `node_id`, with the defaults.
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            lease: architectlm_core::time::DEFAULT_LEASE,
            poll_interval: Duration::from_millis(200),
            batch_size: 512,
            max_in_flight: 4096,
        }
    }

    /// Sets the lease of claimed runs.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the longest pause between two polls.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// Sets the batch size.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Sets the most runs executing at once.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// How long a node reserves a due entry it is planning. Only an efficiency measure (the
    /// version check keeps a firing from being claimed twice), so it is short: entries a dead
    /// node reserved, and entries waiting for a free place, are looked at again after it.
    pub(super) fn hold(&self) -> Duration {
        (self.poll_interval.saturating_mul(5))
            .max(Duration::from_secs(1))
            .min(self.lease)
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.node_id.trim().is_empty() {
            return Err(Error::invalid_config(
                "cluster.node_id",
                format!("{:?}", self.node_id),
                "must not be empty or only whitespace",
            ));
        }
        architectlm_core::time::check_lease(
            "cluster.lease",
            self.lease,
            Duration::from_millis(30),
        )?;
        if self.poll_interval.is_zero() {
            return Err(Error::invalid_config(
                "cluster.poll_interval",
                "0s",
                "must be positive",
            ));
        }
        for (field, v) in [
            ("cluster.batch_size", self.batch_size),
            ("cluster.max_in_flight", self.max_in_flight),
        ] {
            if v == 0 {
                return Err(Error::invalid_config(field, 0, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Most occurrences of one entry waiting for a place across the cluster: one for
/// `queue-one`, as many as one node queues for `allow` at its `max_concurrent`.
fn waiting_cap(overlap: OverlapPolicy) -> usize {
    match overlap {
        OverlapPolicy::Skip => 0,
        OverlapPolicy::QueueOne => 1,
        _ => super::ALLOW_QUEUE,
    }
}

/// Batches of ended runs recorded at once per node.
const FINISH_CONCURRENCY: usize = 4;

/// An ended run on its way to the finisher.
struct Done {
    run: ScheduleRun,
    record: RunRecord,
}

/// The cluster side of a scheduler.
pub(super) struct Cluster {
    pub(super) shared: Arc<dyn SharedScheduleStore>,
    pub(super) opts: ClusterOptions,
    wake: Notify,
    permits: Arc<Semaphore>,
    done: Mutex<Option<mpsc::UnboundedSender<Done>>>,
    finisher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Cluster {
    pub(super) fn new(shared: Arc<dyn SharedScheduleStore>, opts: ClusterOptions) -> Self {
        Self {
            shared,
            permits: Arc::new(Semaphore::new(opts.max_in_flight.max(1))),
            opts,
            wake: Notify::new(),
            done: Mutex::new(None),
            finisher: Mutex::new(None),
        }
    }

    /// Makes the poller look at once.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }
}

impl TaskScheduler {
    fn cluster(&self) -> Option<&Cluster> {
        self.inner.cluster.as_ref()
    }

    /// Starts the poller, taker-over, renewer and finisher; returns the handle of all but the
    /// finisher.
    pub(super) fn start_cluster(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(c) = self.cluster() {
            *c.done.lock() = Some(tx);
            *c.finisher.lock() = Some(tokio::spawn(self.clone().finish_loop(rx)));
        }
        let this = self.clone();
        // Each loop on a task of its own, so that a busy poller never delays a renewal.
        let poller = tokio::spawn(this.clone().poll_loop(cancel.clone()));
        let taker = tokio::spawn(this.clone().takeover_loop(cancel.clone()));
        let renewer = tokio::spawn(this.renew_loop(cancel));
        tokio::spawn(async move {
            let _ = tokio::join!(poller, taker, renewer);
        })
    }

    /// After the poller stopped: lets the finisher record what ended, for a bounded time.
    pub(super) async fn stop_cluster(&self) {
        let Some(c) = self.cluster() else {
            return;
        };
        c.done.lock().take();
        let finisher = c.finisher.lock().take();
        if let Some(h) = finisher {
            // Runs still executing keep a sender; their claims expire and another node (or
            // this one, restarted) runs them again.
            let wait = c.opts.lease.min(Duration::from_secs(5));
            if tokio::time::timeout(wait, h).await.is_err() {
                tracing::warn!(node = %c.opts.node_id, "scheduler stopped with runs still executing; their claims will be taken over");
            }
        }
    }

    async fn poll_loop(self, cancel: CancellationToken) {
        let Some(c) = self.cluster() else {
            return;
        };
        let node = c.opts.node_id.clone();
        let batch = c.opts.batch_size;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let mut full = false;
            let free = c.permits.available_permits().min(batch);
            let now = self.now();
            let mut next_due = None;
            if free > 0 {
                match c.shared.acquire_due(&node, now, c.opts.hold(), free).await {
                    Ok(due) => {
                        full |= due.entries.len() == free;
                        next_due = due.next_due;
                        self.fire_many(due.entries, now).await;
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, error = %e, "cannot look for due entries")
                    }
                }
            }
            if full {
                tokio::task::yield_now().await;
                continue;
            }
            let mut wait = c.opts.poll_interval;
            if let Some(d) = next_due {
                let until = (d - self.now()).to_std().unwrap_or(Duration::ZERO);
                wait = wait.min(until + Duration::from_millis(1));
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = c.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Takes over runs whose lease expired, every poll interval, apart from the poller so
    /// that a busy poller does not delay failover.
    async fn takeover_loop(self, cancel: CancellationToken) {
        let Some(c) = self.cluster() else {
            return;
        };
        let node = c.opts.node_id.clone();
        loop {
            let free = c.permits.available_permits().min(c.opts.batch_size);
            let mut full = false;
            if free > 0 {
                match c.shared.take_expired(&node, c.opts.lease, free).await {
                    Ok(runs) => {
                        full = runs.len() == free;
                        for r in runs {
                            self.take_over(r).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, error = %e, "cannot look for expired runs");
                    }
                }
            }
            let wait = if full {
                Duration::ZERO
            } else {
                c.opts.poll_interval
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn renew_loop(self, cancel: CancellationToken) {
        let Some(c) = self.cluster() else {
            return;
        };
        // Ticks keep their rhythm whatever a renewal takes (a late tick fires at once).
        let mut tick = tokio::time::interval(c.opts.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = c.shared.renew(&c.opts.node_id, c.opts.lease).await {
                tracing::warn!(node = %c.opts.node_id, error = %e, "cannot renew the leases of running runs");
            }
        }
    }

    /// Plans the firings of reserved entries and claims their runs in one transaction.
    ///
    /// Overlap across nodes: `running` counts the entry's claimed, unfinished runs on every
    /// node, read after the entry was locked; the claim is version-checked against the entry
    /// as read, so no other claim or recording slips in between. Beyond the limit (1, or
    /// `max_concurrent` for `allow`), `skip` skips the due runs; `queue-one` and `allow` keep
    /// the entry due at its waiting occurrences, at most [`waiting_cap`] of them (the latest;
    /// earlier ones are skipped with `misfired`, reason `overlap`), and start them as places
    /// free up.
    ///
    /// Jitter: the store makes an entry due at its due time plus its jitter; a firing is a
    /// misfire only when it is later than that by more than the misfire threshold.
    async fn fire_many(&self, entries: Vec<DueEntry>, now: DateTime<Utc>) {
        let Some(c) = self.cluster() else {
            return;
        };
        if entries.is_empty() {
            return;
        }
        let mut claims = Vec::with_capacity(entries.len());
        let mut misses = Vec::with_capacity(entries.len());
        for DueEntry { entry: e, running } in entries {
            let Some(due) = e.task.next_execution_at else {
                continue;
            };
            let jitter = e
                .jitter
                .and_then(|j| chrono::Duration::from_std(j).ok())
                .unwrap_or_else(chrono::Duration::zero);
            let threshold = chrono::Duration::from_std(e.policy.misfire_threshold)
                .ok()
                .and_then(|t| t.checked_add(&jitter))
                .unwrap_or(chrono::Duration::MAX);
            let misfire = now - due > threshold;
            let mut plan = self.plan(&e, due, now, misfire);
            let limit = match e.policy.overlap {
                OverlapPolicy::Allow => e.policy.max_concurrent.unwrap_or(u32::MAX),
                _ => 1,
            };
            let room = limit.saturating_sub(running) as usize;
            let mut overlapped = Vec::new();
            if plan.run.len() > room {
                let rest = plan.run.split_off(room);
                if matches!(e.policy.overlap, OverlapPolicy::Skip) {
                    plan.next = self.next_after_dropped(
                        &e,
                        plan.next,
                        plan.run.len() as u32,
                        rest.last().copied(),
                        now,
                    );
                    overlapped = rest;
                } else if misfire {
                    // Catch-up runs of `fire-all` all wait for each other, as on one node.
                    if plan.run.is_empty() {
                        continue;
                    }
                    plan.next = rest.first().copied();
                    plan.missed = 0;
                } else {
                    // The occurrences passed since the waiting one wait too, at most `cap` of
                    // them: the latest; earlier ones are skipped as overlaps.
                    let cap = waiting_cap(e.policy.overlap).max(1);
                    let mut waiting: std::collections::VecDeque<DateTime<Utc>> = rest.into();
                    let mut next = plan.next;
                    let mut looked = 0;
                    while let Some(n) = next
                        && n <= now
                        && looked < super::MISSED_COUNT_LIMIT
                    {
                        looked += 1;
                        waiting.push_back(n);
                        while waiting.len() > cap {
                            overlapped.extend(waiting.pop_front());
                        }
                        // Only runs started or waiting count toward `max_executions`.
                        let counted = (plan.run.len() + waiting.len()) as u32;
                        next = self.next_after(&e, n, counted);
                    }
                    if plan.run.is_empty() && overlapped.is_empty() {
                        // No place yet and no more waiting than allowed: wait, untouched.
                        continue;
                    }
                    // What is started goes; the entry stays due at the first waiting one.
                    plan.next = waiting.front().copied().or(next);
                    plan.missed = 0;
                }
            }
            let mut n = e.clone();
            let ran = plan.run.len() as u32;
            n.task.execution_count += ran;
            n.task.remaining_executions = Self::remaining(&n);
            n.task.next_execution_at = plan.next;
            if (plan.missed > 0 || !overlapped.is_empty()) && !n.task.is_recurring() && ran == 0 {
                n.task.error = Some(format!(
                    "misfired: due at {} and skipped by the {} policy",
                    e.task.execute_at.to_rfc3339(),
                    if overlapped.is_empty() {
                        "misfire"
                    } else {
                        "overlap"
                    }
                ));
            }
            if ran > 0 {
                n.task.executed_at = Some(now);
            }
            // Misfire decisions go into the run history with the claim, as on one node.
            let opts = &self.inner.options;
            if plan.missed > 0 || misfire {
                let reason = MisfireReason::Late {
                    policy: e.policy.misfire,
                };
                let rec = MisfireRecord::new(reason, plan.missed, ran);
                super::push_history(&mut n, RunRecord::misfire(due, now, rec), opts);
            }
            if let Some(&first) = overlapped.first() {
                let reason = MisfireReason::Overlap {
                    policy: e.policy.overlap,
                };
                let skipped = u32::try_from(overlapped.len()).unwrap_or(u32::MAX);
                let rec = MisfireRecord::new(reason, skipped, ran);
                super::push_history(&mut n, RunRecord::misfire(first, now, rec), opts);
            }
            Self::settle(&mut n, ran + running, 0);
            n.version = e.version + 1;
            misses.push((plan.missed, misfire, overlapped));
            claims.push(Claim {
                entry: n,
                expected_version: e.version,
                due: plan.run,
            });
        }
        let entries: Vec<ScheduleEntry> = claims.iter().map(|c| c.entry.clone()).collect();
        // Claims are stamped now, not with the poll's time: the reservation read the running
        // runs after the poll began, so a run it saw finished may have ended after that time,
        // and a claim stamped with it would seem to start before the run it followed ended.
        let claimed_at = self.now().max(now);
        let out = match c
            .shared
            .claim_batch(&c.opts.node_id, c.opts.lease, claimed_at, claims)
            .await
        {
            Ok(out) => out,
            Err(e) => {
                // Nothing was written; the reservations expire and the firings are planned again.
                tracing::error!(node = %c.opts.node_id, error = %e, "cannot claim due runs; they will be retried");
                return;
            }
        };
        for ((entry, (missed, misfire, overlapped)), res) in
            entries.into_iter().zip(misses).zip(out)
        {
            let claimed = match res {
                Ok(c) => c,
                Err(e) => {
                    // Changed meanwhile (paused, cancelled, rescheduled): planned again from
                    // the new state at the next poll.
                    tracing::debug!(entry = %entry.id(), error = %e, "firing superseded");
                    c.wake();
                    continue;
                }
            };
            if missed > 0 || misfire {
                self.emit(SchedulerEventType::Misfired, &entry, || {
                    json!({"reason": "late", "missed": missed, "running": claimed, "policy": entry.policy.misfire})
                });
            }
            if !overlapped.is_empty() {
                self.emit(SchedulerEventType::Misfired, &entry, || {
                    json!({"reason": "overlap", "skipped": overlapped, "policy": entry.policy.overlap})
                });
            }
            for d in claimed {
                let permit = match c.permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                };
                self.spawn_cluster_run(entry.clone(), d, 1, permit);
            }
        }
    }

    /// Runs again a run whose owner's lease expired.
    async fn take_over(&self, run: ScheduleRun) {
        let Some(c) = self.cluster() else {
            return;
        };
        let entry = match self.inner.store.get(run.entry_id).await {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                // The claim stays ours and is tried again once it expires.
                tracing::warn!(entry = %run.entry_id, error = %e, "cannot load the entry of a run taken over");
                return;
            }
        };
        tracing::info!(node = %c.opts.node_id, entry = %run.entry_id, due = %run.due_at, starts = run.starts,
            "taking over a run whose owner's lease expired");
        if matches!(entry.task.status, ScheduledTaskStatus::Cancelled) {
            let mut r = run.clone();
            r.state = RunState::Failed;
            r.error = Some("abandoned: the entry is no longer active".into());
            r.finished_at = Some(self.now());
            let mut record = RunRecord::new(run.due_at, self.now());
            record.error = r.error.clone();
            self.send_done(Done { run: r, record });
            return;
        }
        let permit = match c.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        self.spawn_cluster_run(entry, run.due_at, run.starts, permit);
    }

    fn send_done(&self, done: Done) {
        let sent = self
            .cluster()
            .and_then(|c| c.done.lock().as_ref().map(|tx| tx.send(done).is_ok()));
        if sent != Some(true) {
            tracing::warn!(
                "scheduler stopping: a run's end is not recorded; its claim will be taken over"
            );
        }
    }

    pub(super) fn spawn_cluster_run(
        &self,
        entry: ScheduleEntry,
        due: DateTime<Utc>,
        starts: u32,
        permit: OwnedSemaphorePermit,
    ) {
        let this = self.clone();
        tokio::spawn(async move { this.cluster_run(entry, due, starts, permit).await });
    }

    async fn cluster_run(
        self,
        entry: ScheduleEntry,
        due: DateTime<Utc>,
        starts: u32,
        permit: OwnedSemaphorePermit,
    ) {
        let Some(runtime) = self.runtime() else {
            return;
        };
        let started = self.now();
        let key = format!("{}@{}", entry.id(), due.to_rfc3339());
        self.emit(SchedulerEventType::Started, &entry, || {
            json!({"due_at": due, "started_at": started, "idempotency_key": key, "starts": starts})
        });
        let mut options =
            ExecuteOptions::default()
                .idempotency_key(key)
                .origin(TaskOrigin::ScheduledRun {
                    entry_id: entry.id(),
                    due_at: due,
                });
        if let Some(r) = entry.policy.retry.clone() {
            options = options.retry(r);
        }
        let outcome = runtime
            .execute(
                TaskRef::Id(entry.task.task_id.clone()),
                entry.task.input.clone(),
                options,
            )
            .await;
        drop(permit);
        if let Some(c) = self.cluster() {
            c.wake();
        }
        if matches!(outcome, Err(Error::ShuttingDown)) {
            // Not run: the claim expires and another node runs it.
            return;
        }
        let outcome = outcome.and_then(crate::checked_result);
        let finished = self.now();
        let mut record = RunRecord::new(due, started);
        record.finished_at = Some(finished);
        let mut run = ScheduleRun::claimed(entry.id(), due, started);
        run.starts = starts;
        run.finished_at = Some(finished);
        match outcome {
            Ok(v) => {
                record.result = Some(v.clone());
                record.attempts = 1;
                run.state = RunState::Completed;
                run.result = Some(v);
            }
            Err(err) => {
                let msg = match err {
                    Error::TaskFailed { error, .. } => error.message,
                    other => other.to_string(),
                };
                record.error = Some(msg.clone());
                record.attempts = entry.policy.retry.as_ref().map_or(1, |r| r.max_attempts);
                run.state = RunState::Failed;
                run.error = Some(msg);
            }
        }
        self.send_done(Done { run, record });
    }

    async fn finish_loop(self, mut rx: mpsc::UnboundedReceiver<Done>) {
        let Some(c) = self.cluster() else {
            return;
        };
        let batch = c.opts.batch_size;
        // A few batches are recorded at once: each waits on the database most of its time.
        let slots = Arc::new(Semaphore::new(FINISH_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        let mut buf = Vec::with_capacity(batch);
        while rx.recv_many(&mut buf, batch).await > 0 {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let done: Vec<Done> = std::mem::take(&mut buf);
            let this = self.clone();
            tasks.spawn(async move {
                this.finish_some(done).await;
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Records one batch of ended runs, retrying while the claims can still be ours.
    async fn finish_some(&self, batch: Vec<Done>) {
        let Some(c) = self.cluster() else {
            return;
        };
        let opts = self.inner.options.clone();
        let mut records: HashMap<(Uuid, i64), RunRecord> = HashMap::with_capacity(batch.len());
        let mut runs = Vec::with_capacity(batch.len());
        for d in batch {
            records.insert((d.run.entry_id, d.run.due_at.timestamp_millis()), d.record);
            runs.push(d.run);
        }
        let apply = move |e: &mut ScheduleEntry, r: &ScheduleRun| {
            if let Some(rec) = records.get(&(r.entry_id, r.due_at.timestamp_millis())) {
                e.task.result = rec.result.clone();
                e.task.error = rec.error.clone();
                e.task.executed_at = Some(rec.started_at);
                super::push_history(e, rec.clone(), &opts);
            }
            Self::settle(e, 0, 0);
        };
        let mut backoff = Duration::from_millis(50);
        let done = loop {
            match c
                .shared
                .finish_batch(&c.opts.node_id, runs.clone(), &apply)
                .await
            {
                Ok(done) => break done,
                Err(e) => {
                    tracing::error!(node = %c.opts.node_id, error = %e, "cannot record the end of runs; retrying");
                    if backoff > c.opts.lease {
                        // Our claims have expired by now; their new owners record them.
                        break Vec::new();
                    }
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        };
        if done.len() < runs.len() {
            tracing::warn!(node = %c.opts.node_id, lost = runs.len() - done.len(),
                "runs were taken over by another node before their end was recorded; their results are dropped");
        }
        for (entry, run) in done {
            let ev = if run.state == RunState::Completed {
                SchedulerEventType::Completed
            } else {
                SchedulerEventType::Failed
            };
            self.emit(ev, &entry, || {
                json!({"due_at": run.due_at, "started_at": run.claimed_at, "finished_at": run.finished_at,
                       "result": run.result, "error": run.error, "starts": run.starts})
            });
        }
    }

    /// Triggers an entry now on a cluster: claims a run at the current millisecond (or the
    /// next one if that is taken) and runs it here.
    pub(super) async fn cluster_trigger(&self, id: Uuid) -> Result<bool> {
        let Some(c) = self.cluster() else {
            return Ok(false);
        };
        for attempt in 0..20 {
            let Some(e) = self.inner.store.get(id).await? else {
                return Ok(false);
            };
            if !e.is_active() {
                return Ok(false);
            }
            let now = self.now();
            let due = truncate_ms(now) + chrono::Duration::milliseconds(attempt);
            let mut n = e.clone();
            n.version = e.version + 1;
            let claim = Claim {
                entry: n.clone(),
                expected_version: e.version,
                due: vec![due],
            };
            let res = c
                .shared
                .claim_batch(&c.opts.node_id, c.opts.lease, now, vec![claim])
                .await?
                .pop()
                .unwrap_or(Ok(Vec::new()));
            match res {
                Ok(claimed) if claimed.is_empty() => continue,
                Ok(_) => {
                    let permit = c
                        .permits
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Error::ShuttingDown)?;
                    self.spawn_cluster_run(n, due, 1, permit);
                    return Ok(true);
                }
                Err(Error::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}
