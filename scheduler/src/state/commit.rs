//! Group commit: the writes of many lock holds in one transaction, written
//! outside the cluster lock.
//!
//! An operation runs under the cluster lock and changes memory; what it
//! staged (a [`Staged`]) and the commands it wants sent (its [`Outbox`])
//! become a batch at the end of the queue, and the lock is released. One
//! writer thread takes every batch queued so far, writes them all in one
//! transaction (one fsync), then delivers their outboxes in queue order and
//! answers their callers. Whoever waits for an acknowledgement (a client's
//! mutation, an agent's report) gets it only after that commit, so nothing
//! acknowledged is lost in a crash; what a crash loses was never answered.
//! While one transaction is written the next batches queue up behind it, so
//! the more callers at once, the more of them share an fsync.
//!
//! Batches are written in the order their operations held the lock, and
//! each operation saw the memory the earlier ones left, so the store goes
//! through the same states as memory did, a group at a time. If a write
//! fails, the store is unchanged (the transaction rolled back) but memory
//! is ahead of it by the group and by whatever queued behind it: the
//! writer fails every batch queued behind the group too (they were built
//! on the undone memory), starts a new generation, so that a batch staged
//! in the old one and queued later fails as well, and marks memory for
//! reloading; the next lock holder ([`Pipeline::recover`]) reloads it from
//! the store before it does anything else. Every caller of a failed batch
//! hears the error; no command of a failed batch reaches an agent.
//!
//! Reads under the lock may see changes whose commit is under way (read
//! uncommitted, for at most one transaction): a caller never hears of its
//! own change before it is durable, but another caller may list a job
//! whose submission is still being written, and would not find it again
//! after a crash at that moment.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::sessions::Sessions;
use crate::cluster::{Outbox, Staged};
use crate::now_ms;
use crate::store::{LedgerQuery, Record, Snapshot, Store, StoreError};

/// The store, shared by the cluster (its reads and reloads, under the
/// cluster lock) and the writer thread (outside it).
#[derive(Clone)]
pub(super) struct SharedStore(pub Arc<Mutex<Box<dyn Store>>>);

impl SharedStore {
    fn get(&self) -> MutexGuard<'_, Box<dyn Store>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for SharedStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.get().load()
    }
    fn ledger(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<crate::domain::billing::LedgerRow>, StoreError> {
        self.get().ledger(from_ms, to_ms)
    }
    fn ledger_page(
        &self,
        q: &LedgerQuery,
    ) -> Result<Vec<crate::domain::billing::LedgerRow>, StoreError> {
        self.get().ledger_page(q)
    }
    fn reader(&self) -> Option<Box<dyn Store>> {
        self.get().reader()
    }
    fn audit_page(
        &self,
        q: &crate::domain::audit::AuditQuery,
    ) -> Result<Vec<crate::domain::audit::AuditEntry>, StoreError> {
        self.get().audit_page(q)
    }
    fn audit_max_seq(&self) -> Result<u64, StoreError> {
        self.get().audit_max_seq()
    }
    fn write(&self, records: &[Record<'_>], now_ms: i64) -> Result<(), StoreError> {
        self.get().write(records, now_ms)
    }
}

/// A generation no batch is ever staged in: what is staged on memory that
/// could not be reloaded is refused with it.
pub(super) const DIVERGED: u64 = u64::MAX;

/// How a batch's caller hears that it is durable (or failed).
pub(super) enum Done {
    /// An async caller awaits it.
    Async(oneshot::Sender<Result<(), StoreError>>),
    /// [`Done::Async`], and `then` runs on the writer once the batch is
    /// committed, whether or not the caller still waits (an audit record's
    /// JSON line: a caller that hung up does not lose it).
    AsyncThen(
        oneshot::Sender<Result<(), StoreError>>,
        Box<dyn FnOnce() + Send>,
    ),
    /// A caller that blocks its thread (never the writer's).
    Blocking(std::sync::mpsc::SyncSender<Result<(), StoreError>>),
}

impl Done {
    fn send(self, result: Result<(), StoreError>) {
        match self {
            Done::Async(tx) => {
                let _ = tx.send(result);
            }
            Done::AsyncThen(tx, then) => {
                if result.is_ok() {
                    then();
                }
                let _ = tx.send(result);
            }
            Done::Blocking(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// One operation's writes and commands.
struct Batch {
    staged: Staged,
    out: Outbox,
    done: Done,
}

#[derive(Default)]
struct Queue {
    batches: Vec<Batch>,
    /// The writer holds batches it took (writing or delivering them).
    busy: bool,
    /// Counts failed writes: a batch staged in an older generation was
    /// built on memory a failure undid.
    generation: u64,
    /// The last failure, for the callers of batches it dooms.
    failure: Option<Arc<StoreError>>,
    /// A write failed: memory is ahead of the store until reloaded.
    reload: bool,
    /// No more batches come; the writer drains the queue and stops.
    closed: bool,
}

/// Counters of the pipeline, for `/metrics`.
#[derive(Clone)]
pub(super) struct Counters {
    pub transactions: prometheus::IntCounter,
    pub batches: prometheus::IntCounter,
    pub seconds: prometheus::Histogram,
}

/// The queue between lock holders and the writer thread.
pub(super) struct Pipeline {
    queue: Mutex<Queue>,
    /// The writer waits here for batches.
    work: Condvar,
    /// Lock holders wait here for the writer to be idle.
    idle: Condvar,
}

impl Pipeline {
    /// A pipeline and its writer thread, writing to `store` and delivering
    /// to `sessions`.
    pub(super) fn start(
        store: SharedStore,
        sessions: Sessions,
        counters: Counters,
    ) -> (Arc<Self>, std::thread::JoinHandle<()>) {
        let pipeline = Arc::new(Self {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
        });
        let p = pipeline.clone();
        let writer = std::thread::Builder::new()
            .name("gpupool-commit".into())
            .spawn(move || p.run(&store, &sessions, &counters))
            .expect("cannot start the commit thread");
        (pipeline, writer)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an operation's writes and commands. Called under the cluster
    /// lock, with the generation [`Pipeline::recover`] gave that lock hold.
    /// With nothing to write, commands go out at once unless earlier
    /// batches are still on their way (then they wait their turn: an agent
    /// gets its commands in the order they were decided).
    pub(super) fn push(
        &self,
        generation: u64,
        staged: Staged,
        out: Outbox,
        done: Done,
        sessions: &Sessions,
    ) {
        if staged.is_empty() && out.is_empty() {
            // A read: nothing to write or send, nothing to wait for.
            done.send(Ok(()));
            return;
        }
        let mut q = self.queue();
        if generation != q.generation {
            // A write failed while this was staged, or memory could not be
            // reloaded after one ([`DIVERGED`]): it is built on undone
            // memory.
            let err = q.failure.clone().unwrap_or_else(|| {
                Arc::new(StoreError::Unreachable(
                    "memory could not be reloaded from the store".into(),
                ))
            });
            drop(q);
            done.send(Err(StoreError::GroupCommit(err)));
            return;
        }
        if staged.is_empty() && q.batches.is_empty() && !q.busy {
            drop(q);
            sessions.deliver(out);
            done.send(Ok(()));
            return;
        }
        q.batches.push(Batch { staged, out, done });
        drop(q);
        self.work.notify_one();
    }

    /// Waits until everything queued so far is written (or failed): for a
    /// caller that answered from memory, so that it does not answer from a
    /// change whose commit is still under way. Called under the cluster
    /// lock, it queues an empty batch (unless nothing is queued); the
    /// returned receiver says how that went.
    pub(super) fn barrier(&self) -> Option<oneshot::Receiver<Result<(), StoreError>>> {
        let mut q = self.queue();
        if q.batches.is_empty() && !q.busy {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        q.batches.push(Batch {
            staged: Staged::default(),
            out: Outbox::new(),
            done: Done::Async(tx),
        });
        drop(q);
        self.work.notify_one();
        Some(rx)
    }

    /// Called under the cluster lock before an operation: whether memory
    /// must be reloaded from the store (a write failed since the last
    /// lock hold), and the generation to stage in.
    pub(super) fn recover(&self) -> (bool, u64) {
        let mut q = self.queue();
        (std::mem::take(&mut q.reload), q.generation)
    }

    /// Blocks until the writer holds nothing and nothing is queued (called
    /// under the cluster lock: the writer never takes it).
    pub(super) fn wait_idle(&self) {
        let mut q = self.queue();
        while q.busy || !q.batches.is_empty() {
            q = self.idle.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops taking batches once the queue is written; returns at once.
    pub(super) fn close(&self) {
        self.queue().closed = true;
        self.work.notify_one();
    }

    /// The writer thread.
    fn run(&self, store: &SharedStore, sessions: &Sessions, counters: &Counters) {
        loop {
            let batches = {
                let mut q = self.queue();
                loop {
                    if !q.batches.is_empty() {
                        break;
                    }
                    if q.closed {
                        return;
                    }
                    q = self.work.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.busy = true;
                std::mem::take(&mut q.batches)
            };
            let mut all = Staged::default();
            let mut rest = Vec::with_capacity(batches.len());
            for b in batches {
                all.append(b.staged);
                rest.push((b.out, b.done));
            }
            let result = if all.is_empty() {
                Ok(())
            } else {
                counters.transactions.inc();
                let _timer = counters.seconds.start_timer();
                // A panic in the store fails the group like an error does
                // (everyone is answered; the next lock holder reloads).
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    all.write(&**store.get(), now_ms())
                }))
                .unwrap_or_else(|_| {
                    Err(StoreError::Unreachable(
                        "the store panicked while writing".into(),
                    ))
                })
            };
            counters.batches.inc_by(rest.len() as u64);
            match result {
                Ok(()) => {
                    let mut dones = Vec::with_capacity(rest.len());
                    for (out, done) in rest {
                        sessions.deliver(out);
                        dones.push(done);
                    }
                    self.queue().busy = false;
                    self.idle.notify_all();
                    for done in dones {
                        done.send(Ok(()));
                    }
                }
                Err(err) => {
                    tracing::error!(
                        error = %crate::ErrorChain(&err),
                        changes = rest.len(),
                        "cannot persist state; the changes are undone"
                    );
                    let err = Arc::new(err);
                    let doomed = {
                        let mut q = self.queue();
                        q.busy = false;
                        q.generation += 1;
                        q.failure = Some(err.clone());
                        q.reload = true;
                        std::mem::take(&mut q.batches)
                    };
                    self.idle.notify_all();
                    let behind = doomed.into_iter().map(|b| b.done);
                    for done in rest.into_iter().map(|(_, done)| done).chain(behind) {
                        done.send(Err(StoreError::GroupCommit(err.clone())));
                    }
                }
            }
        }
    }
}
