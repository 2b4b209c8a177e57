//! Power loss, simulated: the state's two files are written to memory that remembers, on one
//! clock, every write and every sync. A workload runs to the end; then, for many moments of
//! it, the files are rebuilt as a power loss at that moment could have left them (everything
//! synced before it, and of the writes not yet synced only those before a random point) and the
//! state is opened on them. It must open, hold every batch whose `apply` had returned by then,
//! and every run's event chain must verify.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, RngExt as _, SeedableRng};

use super::*;
use crate::state::journal::JournalFile;

/// One thing a file was told.
#[derive(Debug, Clone)]
enum Op {
    Write { tick: u64, at: u64, data: Vec<u8> },
    SetLen { tick: u64, len: u64 },
    Sync { tick: u64 },
}

impl Op {
    fn tick(&self) -> u64 {
        match self {
            Op::Write { tick, .. } | Op::SetLen { tick, .. } | Op::Sync { tick } => *tick,
        }
    }

    fn apply(&self, image: &mut Vec<u8>) {
        match self {
            Op::Write { at, data, .. } => {
                let end = *at as usize + data.len();
                if image.len() < end {
                    image.resize(end, 0);
                }
                image[*at as usize..end].copy_from_slice(data);
            }
            Op::SetLen { len, .. } => image.resize(*len as usize, 0),
            Op::Sync { .. } => {}
        }
    }
}

/// A file in memory: what it holds now, and everything it was told, on the shared clock.
#[derive(Debug)]
struct SimFile {
    clock: Arc<AtomicU64>,
    inner: Mutex<(Vec<u8>, Vec<Op>)>,
}

impl SimFile {
    fn new(clock: &Arc<AtomicU64>, image: Vec<u8>) -> Arc<SimFile> {
        Arc::new(SimFile {
            clock: clock.clone(),
            inner: Mutex::new((image, Vec::new())),
        })
    }

    fn tell(&self, op: Op) {
        let mut inner = self.inner.lock().unwrap();
        op.apply(&mut inner.0);
        inner.1.push(op);
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn read(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        let inner = self.inner.lock().unwrap();
        let end = at as usize + buf.len();
        if end > inner.0.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&inner.0[at as usize..end]);
        Ok(())
    }

    fn ops(&self) -> Vec<Op> {
        self.inner.lock().unwrap().1.clone()
    }
}

impl JournalFile for SimFile {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.inner.lock().unwrap().0.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        self.read(buf, at)
    }
    fn write_at(&self, buf: &[u8], at: u64) -> std::io::Result<()> {
        let tick = self.tick();
        self.tell(Op::Write {
            tick,
            at,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        let tick = self.tick();
        self.tell(Op::Sync { tick });
        Ok(())
    }
}

/// The database's side of a [`SimFile`].
#[derive(Debug)]
struct SimDb(Arc<SimFile>);

impl redb::StorageBackend for SimDb {
    fn len(&self) -> std::io::Result<u64> {
        JournalFile::len(&*self.0)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(out, offset)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let tick = self.0.tick();
        self.0.tell(Op::SetLen { tick, len });
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_at(data, offset)
    }
}

/// A database file as [`Store::open`] leaves it when it makes one: created apart, whole, and
/// only then given its name, so no power loss finds a database half made.
fn created(clock: &Arc<AtomicU64>) -> Vec<u8> {
    let file = SimFile::new(clock, Vec::new());
    drop(
        redb::Builder::new()
            .create_with_backend(SimDb(file.clone()))
            .unwrap(),
    );
    file.inner.lock().unwrap().0.clone()
}

/// A state on simulated files; checkpoints every 16 KiB, so a short workload crosses many.
fn open(
    clock: &Arc<AtomicU64>,
    db: Vec<u8>,
    journal: Vec<u8>,
) -> (Store, Arc<SimFile>, Arc<SimFile>) {
    let (db, journal) = (SimFile::new(clock, db), SimFile::new(clock, journal));
    let store = Store::open_on(
        SimDb(db.clone()),
        journal.clone(),
        Path::new("simulated"),
        16 << 10,
    )
    .expect("a state on fresh files opens");
    (store, db, journal)
}

/// What a workload acknowledged: at this tick, this run had this many events.
struct Ack {
    tick: u64,
    run: RunId,
    events: usize,
}

/// A chain of steps, one batch per transition, each synced, acknowledged as `apply` returns;
/// with writes synced behind between them, and a wide fan of steps per batch when `wide`.
fn workload(store: &Store, clock: &AtomicU64, steps: usize, wide: usize) -> Vec<Ack> {
    let ids: Vec<String> = (0..steps).map(|i| format!("s{i:03}")).collect();
    let run = store
        .create_run("load", "/w.toml", "/ws", &serde_json::json!({}), &ids)
        .unwrap();
    let mut acks = vec![Ack {
        tick: clock.load(Ordering::SeqCst),
        run,
        events: store.events(run).unwrap().len(),
    }];
    let mut ack = |store: &Store| {
        acks.push(Ack {
            tick: clock.load(Ordering::SeqCst),
            run,
            events: store.events(run).unwrap().len(),
        })
    };
    store
        .apply(&[Change::RunState {
            run,
            to: RunState::Running,
            reason: None,
        }])
        .unwrap();
    ack(store);
    for group in ids.chunks(wide) {
        let mut start = Vec::new();
        for id in group {
            start.push(Change::StepState {
                run,
                step: id.clone(),
                to: StepState::Running,
                reason: None,
                output: None,
            });
            start.push(Change::AttemptStarted {
                run,
                step: id.clone(),
                number: 1,
                tool: "t".into(),
            });
        }
        // behind: not acknowledged until a synced write after it returns
        store.apply_sync_behind(&start).unwrap();
        let mut end = Vec::new();
        for id in group {
            end.push(Change::AttemptFinished {
                run,
                step: id.clone(),
                number: 1,
                outcome: Outcome::Succeeded,
                error: None,
                stdout: "o".repeat(200),
                stderr: String::new(),
                retry_at: None,
            });
            end.push(Change::StepState {
                run,
                step: id.clone(),
                to: StepState::Succeeded,
                reason: None,
                output: Some(serde_json::json!({ "step": id, "pad": "p".repeat(100) })),
            });
        }
        store.apply(&end).unwrap();
        ack(store);
    }
    acks
}

/// A file as a power loss at `crash` could leave it: what it held at first (`initial`), every
/// op synced before the loss, then a random prefix of those after the last sync.
fn after_loss(initial: &[u8], ops: &[Op], crash: u64, rng: &mut impl Rng) -> Vec<u8> {
    let before: Vec<&Op> = ops.iter().filter(|op| op.tick() < crash).collect();
    let synced = before
        .iter()
        .rposition(|op| matches!(op, Op::Sync { .. }))
        .map_or(0, |i| i + 1);
    let kept = synced + rng.random_range(0..=before.len() - synced);
    let mut image = initial.to_vec();
    for op in &before[..kept] {
        op.apply(&mut image);
    }
    image
}

/// Runs a workload, then cuts the power at `cuts` random moments of it and checks the state
/// each leaves.
fn survive(steps: usize, wide: usize, cuts: usize, seed: u64) {
    let clock = Arc::new(AtomicU64::new(0));
    let fresh = created(&clock);
    let start = clock.load(Ordering::SeqCst);
    let (store, db, journal) = open(&clock, fresh.clone(), vec![0; 64 << 10]);
    let acks = workload(&store, &clock, steps, wide);
    // the clean close's checkpoint is a moment to lose power in too
    drop(store);
    let (db_ops, journal_ops) = (db.ops(), journal.ops());
    let end = clock.load(Ordering::SeqCst);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // a checkpoint syncs the database: the workload must have crossed several
    let checkpoints = db_ops
        .iter()
        .filter(|op| matches!(op, Op::Sync { .. }))
        .count();
    assert!(checkpoints >= 3, "only {checkpoints} syncs of the database");
    for _ in 0..cuts {
        let crash = rng.random_range(start..=end);
        let db_image = after_loss(&fresh, &db_ops, crash, &mut rng);
        let journal_image = after_loss(&vec![0; 64 << 10], &journal_ops, crash, &mut rng);
        let label = format!("power lost at tick {crash} of {end} (seed {seed})");
        let store = match Store::open_on(
            SimDb(SimFile::new(&clock, db_image)),
            SimFile::new(&clock, journal_image),
            Path::new("simulated"),
            16 << 10,
        ) {
            Ok(store) => store,
            Err(e) => panic!("{label}: the state does not open: {e}"),
        };
        let Some(last) = acks.iter().rev().find(|a| a.tick <= crash) else {
            continue;
        };
        let events = store.events(last.run).map(|e| e.len()).unwrap_or(0);
        assert!(
            events >= last.events,
            "{label}: an acknowledged batch is lost: {events} events, {} acknowledged",
            last.events
        );
        match store.verify(last.run) {
            Ok(Ok(_)) => {}
            other => panic!("{label}: the event chain does not verify: {other:?}"),
        }
    }
}

#[test]
fn a_chain_survives_power_loss_at_600_moments() {
    survive(120, 1, 600, 1);
}

#[test]
fn a_wide_run_survives_power_loss_at_500_moments() {
    survive(400, 16, 500, 2);
}
