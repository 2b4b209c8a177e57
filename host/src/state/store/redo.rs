//! A batch's row writes as the journal records them, and their replay into the database.

use super::*;

/// One batch's row writes in the journal's encoding: per row the table's tag, the key's parts
/// and the value, little-endian, strings and values prefixed by their length. Replaying them is
/// a matter of inserting each again, and doing so twice changes nothing.
#[derive(Default)]
pub(super) struct Redo(pub(super) Vec<u8>);

impl Redo {
    /// One row of a table batches write: the table's tag, the key, the value.
    pub(super) fn row<K: JournalKey>(
        &mut self,
        table: TableDefinition<K, &[u8]>,
        key: K::SelfType<'_>,
        value: &[u8],
    ) {
        self.0.push(journal_tag(table));
        K::put(key, self);
        self.bytes(value);
    }

    pub(super) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(super) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(super) fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    pub(super) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
}

/// Reads a [`Redo`] back.
pub(super) struct Unredo<'a>(pub(super) &'a [u8]);

/// A journal record that passed its checksum but does not parse: a bug, not a torn write.
pub(super) fn malformed(error: String) -> StateError {
    StateError::Corrupt {
        table: "journal",
        key: "a batch".into(),
        error,
    }
}

impl<'a> Unredo<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(malformed("it ends inside a row".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    pub(super) fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }

    pub(super) fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }

    pub(super) fn bytes(&mut self) -> Result<&'a [u8], StateError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub(super) fn str(&mut self) -> Result<&'a str, StateError> {
        std::str::from_utf8(self.bytes()?).map_err(|e| malformed(e.to_string()))
    }
}

/// Writes journal records' rows into `tx`, in order: a row that several of them wrote is
/// written once, with its last value (a step's row changes two or three times in a few
/// milliseconds, the run's with every batch).
pub(super) fn replay(tx: &WriteTransaction, records: &[&[u8]]) -> Result<(), StateError> {
    // in key order: neighbouring rows go into the same pages one after the other
    let mut latest: BTreeMap<(u8, &[u8]), &[u8]> = BTreeMap::new();
    for record in records {
        let mut r = Unredo(record);
        while let Some((&tag, rest)) = r.0.split_first() {
            r.0 = rest;
            let key = r.0;
            // the key's parts, skipped: the key is the bytes they span
            let mut known = false;
            macro_rules! skip {
                ($tag:literal, $table:ident) => {
                    if tag == $tag {
                        skip_key($table, &mut r)?;
                        known = true;
                    }
                };
            }
            journaled_tables!(skip);
            if !known {
                return Err(malformed(format!("unknown table tag {tag}")));
            }
            let key = &key[..key.len() - r.0.len()];
            latest.insert((tag, key), r.bytes()?);
        }
    }
    // a run row's state, before and after, moves the counts of runs by state
    let mut moves = counts::Moves::default();
    macro_rules! put {
        ($tag:literal, $table:ident) => {
            put_rows(
                tx,
                $table,
                latest.range(($tag, &[][..])..($tag + 1, &[][..])),
                (stringify!($table) == "RUNS").then_some(&mut moves),
            )?;
        };
    }
    journaled_tables!(put);
    counts::apply(tx, &moves)
}

fn skip_key<K: JournalKey>(
    _table: TableDefinition<K, &[u8]>,
    r: &mut Unredo<'_>,
) -> Result<(), StateError> {
    K::get(r).map(drop)
}

/// Puts the rows of one table, their keys as the journal wrote them.
fn put_rows<'r, K: JournalKey>(
    tx: &WriteTransaction,
    table: TableDefinition<K, &[u8]>,
    rows: impl Iterator<Item = (&'r (u8, &'r [u8]), &'r &'r [u8])>,
    mut moves: Option<&mut counts::Moves>,
) -> Result<(), StateError> {
    let mut open = tx.open_table(table).map_err(storage)?;
    for ((_, key), value) in rows {
        let mut r = Unredo(key);
        let old = open.insert(K::get(&mut r)?, *value).map_err(storage)?;
        if let Some(moves) = moves.as_deref_mut() {
            // the runs table's key is the run id
            let run = Unredo(key).u64()?;
            let before = old.and_then(|o| counts::state_of(o.value()));
            counts::moved(moves, run, before, counts::state_of(value));
        }
    }
    Ok(())
}
