//! The whole storage schema in one place: the tables, the rows they hold, the tables each
//! batch writes with the tag their rows carry in the journal, and the list every walk of the
//! state (creating it, copying it, checking it) goes by.

use super::*;

/// The layout version this build writes; a file from a newer layout is refused, not misread.
pub(super) const SCHEMA_VERSION: u64 = 1;

// The whole schema. Records are JSON: readable with any redb tool, and cheap next to the fsync
// that every commit costs.
/// Counters: `next_run`, `schema`, and [`JOURNAL_GENERATION`].
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Run id → [`RunRow`].
pub(super) const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("runs");

/// Run id → the validated plan as JSON, so a run can resume without its original file. Kept
/// apart from the run row, which every transition rewrites.
pub(super) const PLANS: TableDefinition<u64, &[u8]> = TableDefinition::new("plans");

/// (run, step id) → [`StepRow`].
pub(super) const STEPS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("steps");

/// (run, step id, attempt number) → [`AttemptRecord`].
pub(super) const ATTEMPTS: TableDefinition<(u64, &str, u32), &[u8]> =
    TableDefinition::new("attempts");

/// Claim name of a file picked up from a watched folder → `{run, sha256}` JSON: written in the
/// transaction that creates the run, so a restart knows a claimed file was already recorded.
pub(super) const SUBMISSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("submissions");

/// Standing workflow key (workstream and name) → `{plan, source, workstream}` JSON.
pub(super) const STANDING: TableDefinition<&str, &[u8]> = TableDefinition::new("standing");

/// Tool name → JSON list of the durations (ms) of its latest successful attempts, oldest
/// first: the history ETAs are estimated from.
pub(super) const DURATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("durations");

/// How many durations are kept per tool: enough for a steady median, few enough to follow a
/// tool that got faster or slower.
pub(super) const DURATIONS_KEPT: usize = 32;

/// Tool name → [`ToolStats`]: counters for `uet metrics`, kept as attempts end so a scrape
/// never walks the history.
pub(super) const TOOL_STATS: TableDefinition<&str, &[u8]> = TableDefinition::new("tool_stats");

/// Tool name → [`crate::model::BreakerRecord`].
pub(super) const BREAKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("breakers");

/// (run, seq) → [`EventRecord`].
pub(super) const EVENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("events");

/// The runs not yet ended (pending or running): kept with the counts (`counts.rs`), so that
/// `uet top` and a daemon's start find them without reading every run.
pub(super) const UNFINISHED: TableDefinition<u64, ()> = TableDefinition::new("unfinished");

/// Applies the macro `$each` to every table of the schema, by the name of its definition: the
/// one list that creating, copying and checking the state go by.
macro_rules! every_table {
    ($each:ident) => {
        $each!(META);
        $each!(UNFINISHED);
        every_json_table!($each);
    };
}

/// [`every_table!`] but `meta`: the tables whose values are JSON rows.
macro_rules! every_json_table {
    ($each:ident) => {
        $each!(RUNS);
        $each!(PLANS);
        $each!(STEPS);
        $each!(ATTEMPTS);
        $each!(SUBMISSIONS);
        $each!(STANDING);
        $each!(DURATIONS);
        $each!(TOOL_STATS);
        $each!(BREAKERS);
        $each!(EVENTS);
    };
}

/// The journal generation the database's last durable commit named: the journal's records of
/// that generation are the batches committed since, and are replayed on open.
pub(super) const JOURNAL_GENERATION: &str = "journal";

/// A run as stored: the record plus the next event number of its log.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct RunRow {
    pub(super) record: RunRecord,
    pub(super) next_event: u64,
    /// The hash of the run's latest event: the head of its chain, so a log cut short is
    /// caught too.
    #[serde(default)]
    pub(super) last_hash: String,
}

/// A step row read without its output, which the parser skips over instead of building: every
/// field of [`StepRecord`] but `output`.
#[derive(Deserialize)]
pub(super) struct BriefRow {
    pub(super) position: u32,
    pub(super) record: BriefStep,
}

#[derive(Deserialize)]
pub(super) struct BriefStep {
    pub(super) id: String,
    pub(super) state: StepState,
    pub(super) attempts: u32,
    pub(super) tool: Option<String>,
    pub(super) reason: Option<String>,
    pub(super) started_at: Option<Millis>,
    pub(super) finished_at: Option<Millis>,
    #[serde(default)]
    pub(super) progress: Option<f32>,
    #[serde(default)]
    pub(super) attempt_started_at: Option<Millis>,
}

impl From<BriefRow> for StepRow {
    fn from(row: BriefRow) -> StepRow {
        let s = row.record;
        StepRow {
            position: row.position,
            record: StepRecord {
                id: s.id,
                state: s.state,
                attempts: s.attempts,
                tool: s.tool,
                output: None,
                reason: s.reason,
                started_at: s.started_at,
                finished_at: s.finished_at,
                progress: s.progress,
                attempt_started_at: s.attempt_started_at,
            },
        }
    }
}

/// A step as stored: the record plus its place in the workflow, for listing in order.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct StepRow {
    pub(super) position: u32,
    pub(super) record: StepRecord,
}

impl StepRow {
    /// A step as a new run records it: pending, never tried.
    pub(super) fn new(position: u32, id: &str) -> StepRow {
        StepRow {
            position,
            record: StepRecord {
                id: id.to_string(),
                state: StepState::Pending,
                attempts: 0,
                tool: None,
                output: None,
                reason: None,
                started_at: None,
                finished_at: None,
                progress: None,
                attempt_started_at: None,
            },
        }
    }
}

/// The upper bounds (seconds) of the attempt-duration histogram buckets; `+Inf` is implied.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Counters of one tool's attempts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ToolStats {
    /// Attempts by outcome (`succeeded`, `failed`, `timed_out`, ...).
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// Attempts per duration bucket (not cumulative), one more than [`DURATION_BUCKETS`].
    pub buckets: Vec<u64>,
    /// The sum of all attempt durations, in seconds.
    pub seconds: f64,
}

impl ToolStats {
    pub(super) fn record(&mut self, outcome: Outcome, ms: u64) {
        *self
            .outcomes
            .entry(outcome_name(outcome).to_string())
            .or_insert(0) += 1;
        self.buckets.resize(DURATION_BUCKETS.len() + 1, 0);
        let secs = ms as f64 / 1000.0;
        let slot = DURATION_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[slot] += 1;
        self.seconds += secs;
    }
}

/// The tables batches write, each with the tag its rows carry in the journal: the one list the
/// journal's encoding ([`Redo::row`]) and its replay ([`replay`]) go by. A tag, once given, is
/// never given to another table: journals written by an older uet are replayed by a newer one.
macro_rules! journaled_tables {
    ($each:ident) => {
        $each!(1, RUNS);
        $each!(2, STEPS);
        $each!(3, ATTEMPTS);
        $each!(4, EVENTS);
        $each!(5, BREAKERS);
        $each!(6, DURATIONS);
        $each!(7, TOOL_STATS);
    };
}

/// The journal tag of a table batches write.
pub(super) fn journal_tag<K: redb::Key + 'static>(table: TableDefinition<K, &[u8]>) -> u8 {
    use redb::TableHandle;
    let name = table.name();
    macro_rules! tag_of {
        ($tag:literal, $table:ident) => {
            if name == $table.name() {
                return $tag;
            }
        };
    }
    journaled_tables!(tag_of);
    unreachable!("table {name} is not one that batches write")
}

/// A key of the schema as the journal writes it: its parts in order, numbers little-endian,
/// strings prefixed by their length.
pub(super) trait JournalKey: redb::Key + 'static {
    /// Writes a key.
    fn put(key: Self::SelfType<'_>, redo: &mut Redo);
    /// Reads a key back.
    fn get<'a>(r: &mut Unredo<'a>) -> Result<Self::SelfType<'a>, StateError>;
}

impl JournalKey for u64 {
    fn put(key: u64, redo: &mut Redo) {
        redo.u64(key);
    }
    fn get<'a>(r: &mut Unredo<'a>) -> Result<u64, StateError> {
        r.u64()
    }
}

impl JournalKey for &'static str {
    fn put(key: &str, redo: &mut Redo) {
        redo.str(key);
    }
    fn get<'a>(r: &mut Unredo<'a>) -> Result<&'a str, StateError> {
        r.str()
    }
}

impl JournalKey for (u64, &'static str) {
    fn put((run, step): (u64, &str), redo: &mut Redo) {
        redo.u64(run).str(step);
    }
    fn get<'a>(r: &mut Unredo<'a>) -> Result<(u64, &'a str), StateError> {
        Ok((r.u64()?, r.str()?))
    }
}

impl JournalKey for (u64, &'static str, u32) {
    fn put((run, step, number): (u64, &str, u32), redo: &mut Redo) {
        redo.u64(run).str(step).u32(number);
    }
    fn get<'a>(r: &mut Unredo<'a>) -> Result<(u64, &'a str, u32), StateError> {
        Ok((r.u64()?, r.str()?, r.u32()?))
    }
}

impl JournalKey for (u64, u64) {
    fn put((run, seq): (u64, u64), redo: &mut Redo) {
        redo.u64(run).u64(seq);
    }
    fn get<'a>(r: &mut Unredo<'a>) -> Result<(u64, u64), StateError> {
        Ok((r.u64()?, r.u64()?))
    }
}
