//! The peer book: every peer the hub knows, with its data and the last outcome of dialling it,
//! kept in memory or in an embedded redb file so a restarted hub dials its peers again.
//!
//! A peer is in one of three [`BookState`]s. `Kept` peers are the ones [`Hub::connect`] was
//! asked for: the hub keeps (redials) them, and [`Hub::connect_book`] dials them again after a
//! restart. `Staged` peers are suggestions ([`Hub::stage`], ssb-conn's staging area): known,
//! listed by [`Hub::staged`], never dialled until someone connects them, which moves them to
//! `Kept`. `Known` peers were disconnected on request: remembered with their last outcome, not
//! dialled. [`Hub::forget`] removes a peer from the book.
//!
//! Writes are synchronous and small (one row). A change of state is committed durably before
//! the call that made it returns; outcomes (connected, failed, disconnected) are committed
//! without an fsync and made durable by the next durable commit or [`PeerBook::flush`] (which
//! [`Hub::close`] calls), so a hub that is killed may lose its latest outcomes, never its peers.
//!
//! ```
//! # fn demo() -> Result<(), tether::hub::BookError> {
//! use tether::hub::{BookState, PeerBook};
//! use tether_wire::Object;
//!
//! let dir = std::env::temp_dir().join(format!("book-doc-{}", std::process::id()));
//! let path = dir.with_extension("redb");
//! {
//!     let book = PeerBook::open(&path)?;
//!     book.put("net:127.0.0.1:3000", BookState::Kept, Object::new())?;
//! }
//! let book = PeerBook::open(&path)?;
//! assert_eq!(book.get("net:127.0.0.1:3000").unwrap().state, BookState::Kept);
//! # drop(book); let _ = std::fs::remove_file(&path);
//! # Ok(()) }
//! # demo().unwrap();
//! ```
//!
//! [`Hub::connect`]: super::Hub::connect
//! [`Hub::connect_book`]: super::Hub::connect_book
//! [`Hub::stage`]: super::Hub::stage
//! [`Hub::staged`]: super::Hub::staged
//! [`Hub::forget`]: super::Hub::forget
//! [`Hub::close`]: super::Hub::close

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
#[cfg(feature = "redb")]
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tether_wire::{Object, Value};
use thiserror::Error;

#[cfg(feature = "redb")]
const PEERS: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("hub_peers");

/// What can go wrong with the peer book.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BookError {
    /// The redb file could not be opened, read or written.
    #[cfg(feature = "redb")]
    #[error("peer book storage")]
    Store(#[from] redb::Error),
    /// A row of the file is not a peer record (written by something else, or damaged).
    #[error("peer book row for {address:?} is unreadable")]
    Corrupt {
        /// The row's address.
        address: String,
        /// Why it could not be read.
        #[source]
        source: serde_json::Error,
    },
}

/// Where a peer stands in the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BookState {
    /// Asked for by `connect`: kept connected, and dialled again after a restart.
    Kept,
    /// Suggested by `stage`: known, not dialled.
    Staged,
    /// Disconnected on request: remembered, not dialled.
    Known,
}

/// What happened the last time the hub dealt with a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OutcomeKind {
    /// It connected.
    Connected,
    /// A dial failed (the error is in [`Outcome::detail`]).
    ConnectingFailed,
    /// Its connection ended (the cause is in [`Outcome::detail`]).
    Disconnected,
}

/// The last outcome of a peer, with when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What happened.
    pub kind: OutcomeKind,
    /// The error or cause, as text (it is stored, so it cannot keep its type).
    pub detail: Option<String>,
    /// When.
    pub at: SystemTime,
}

/// One peer in the book.
#[derive(Debug, Clone, PartialEq)]
pub struct BookEntry {
    /// Kept, staged or known.
    pub state: BookState,
    /// Caller data from `connect` or `stage`.
    pub data: Object,
    /// The last outcome, if it was ever dialled.
    pub last: Option<Outcome>,
}

/// The stored form of a row: JSON with the data in mdsf, so any JSTP value survives.
#[derive(Serialize, Deserialize)]
struct Record {
    state: BookState,
    data: String,
    last: Option<StoredOutcome>,
}

#[derive(Serialize, Deserialize)]
struct StoredOutcome {
    kind: OutcomeKind,
    detail: Option<String>,
    at_ms: u64,
}

impl BookEntry {
    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    fn encode(&self) -> String {
        let record = Record {
            state: self.state,
            data: Value::Object(self.data.clone()).to_mdsf(),
            last: self.last.as_ref().map(|o| StoredOutcome {
                kind: o.kind.clone(),
                detail: o.detail.clone(),
                at_ms: o
                    .at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            }),
        };
        // A struct of strings, numbers and unit variants always serializes.
        serde_json::to_string(&record).unwrap_or_default()
    }

    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    fn decode(address: &str, text: &str) -> Result<BookEntry, BookError> {
        let record: Record = serde_json::from_str(text).map_err(|source| BookError::Corrupt {
            address: address.to_owned(),
            source,
        })?;
        // Data that no longer parses as an object is dropped rather than losing the peer.
        let data = match tether_wire::parse(&record.data) {
            Ok(Value::Object(o)) => o,
            _ => Object::new(),
        };
        Ok(BookEntry {
            state: record.state,
            data,
            last: record.last.map(|o| Outcome {
                kind: o.kind,
                detail: o.detail,
                at: UNIX_EPOCH + Duration::from_millis(o.at_ms),
            }),
        })
    }
}

struct BookInner {
    /// Every row, mirrored in memory so reads never touch the file.
    rows: Mutex<BTreeMap<String, BookEntry>>,
    #[cfg(feature = "redb")]
    db: Option<redb::Database>,
}

/// Known peers, in memory or persisted in a redb file. Cloning gives another handle on the
/// same book. Its size is the number of peers put in it: the hub adds one row per address it
/// is asked to connect or stage, and removes it on [`PeerBook::remove`] (`Hub::forget`).
#[derive(Clone)]
pub struct PeerBook {
    inner: Arc<BookInner>,
}

impl std::fmt::Debug for PeerBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerBook")
            .field("peers", &self.len())
            .field("persistent", &self.is_persistent())
            .finish()
    }
}

impl Default for PeerBook {
    fn default() -> Self {
        PeerBook::memory()
    }
}

#[cfg(feature = "redb")]
fn store_err(e: impl Into<redb::Error>) -> BookError {
    BookError::Store(e.into())
}

impl PeerBook {
    /// A book in memory only (the hub's default).
    pub fn memory() -> PeerBook {
        PeerBook {
            inner: Arc::new(BookInner {
                rows: Mutex::new(BTreeMap::new()),
                #[cfg(feature = "redb")]
                db: None,
            }),
        }
    }

    #[cfg(feature = "redb")]
    /// Opens (or creates) the book at `path` and reads it. Blocking. Only one process may
    /// hold the file at a time (redb locks it).
    pub fn open(path: impl AsRef<Path>) -> Result<PeerBook, BookError> {
        let db = redb::Database::create(path).map_err(store_err)?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(PEERS).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        let mut rows = BTreeMap::new();
        {
            let tx = redb::ReadableDatabase::begin_read(&db).map_err(store_err)?;
            let table = tx.open_table(PEERS).map_err(store_err)?;
            for row in redb::ReadableTable::iter(&table).map_err(store_err)? {
                let (k, v) = row.map_err(store_err)?;
                let address = k.value().to_owned();
                let entry = BookEntry::decode(&address, v.value())?;
                rows.insert(address, entry);
            }
        }
        Ok(PeerBook {
            inner: Arc::new(BookInner {
                rows: Mutex::new(rows),
                db: Some(db),
            }),
        })
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BookEntry>> {
        self.inner.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one row (or removes it) to the file, durably or not.
    #[cfg(feature = "redb")]
    fn write(
        &self,
        address: &str,
        entry: Option<&BookEntry>,
        durable: bool,
    ) -> Result<(), BookError> {
        let Some(db) = &self.inner.db else {
            return Ok(());
        };
        let mut tx = db.begin_write().map_err(store_err)?;
        if !durable {
            tx.set_durability(redb::Durability::None)
                .map_err(store_err)?;
        }
        {
            let mut table = tx.open_table(PEERS).map_err(store_err)?;
            match entry {
                Some(e) => {
                    table
                        .insert(address, e.encode().as_str())
                        .map_err(store_err)?;
                }
                None => {
                    table.remove(address).map_err(store_err)?;
                }
            }
        }
        tx.commit().map_err(store_err)
    }

    /// Every peer, sorted by address.
    pub fn entries(&self) -> Vec<(String, BookEntry)> {
        self.rows()
            .iter()
            .map(|(a, e)| (a.clone(), e.clone()))
            .collect()
    }

    /// The peers in `state`, sorted by address.
    pub fn in_state(&self, state: BookState) -> Vec<(String, BookEntry)> {
        self.rows()
            .iter()
            .filter(|(_, e)| e.state == state)
            .map(|(a, e)| (a.clone(), e.clone()))
            .collect()
    }

    /// The peer at `address`.
    pub fn get(&self, address: &str) -> Option<BookEntry> {
        self.rows().get(address).cloned()
    }

    /// How many peers the book holds.
    pub fn len(&self) -> usize {
        self.rows().len()
    }

    /// `true` when the book is kept in a file (its writes block on the disk).
    pub fn is_persistent(&self) -> bool {
        #[cfg(feature = "redb")]
        {
            self.inner.db.is_some()
        }
        // Without redb there is no file: every book is in memory.
        #[cfg(not(feature = "redb"))]
        {
            false
        }
    }

    /// `true` when the book holds no peer.
    pub fn is_empty(&self) -> bool {
        self.rows().is_empty()
    }

    /// Puts `address` in `state` with `data`, keeping its last outcome; durable.
    pub fn put(&self, address: &str, state: BookState, data: Object) -> Result<(), BookError> {
        let mut rows = self.rows();
        let last = rows.get(address).and_then(|e| e.last.clone());
        let entry = BookEntry { state, data, last };
        self.write(address, Some(&entry), true)?;
        rows.insert(address.to_owned(), entry);
        Ok(())
    }

    /// Moves `address` to `state` if it is in the book (its data and outcome stay); durable.
    /// `Ok(false)` if it is not in the book.
    pub fn set_state(&self, address: &str, state: BookState) -> Result<bool, BookError> {
        let mut rows = self.rows();
        let Some(entry) = rows.get(address) else {
            return Ok(false);
        };
        if entry.state == state {
            return Ok(true);
        }
        let entry = BookEntry {
            state,
            ..entry.clone()
        };
        self.write(address, Some(&entry), true)?;
        rows.insert(address.to_owned(), entry);
        Ok(true)
    }

    /// Records the last outcome of `address` if it is in the book (not fsynced: see the
    /// module docs).
    pub fn record(
        &self,
        address: &str,
        kind: OutcomeKind,
        detail: Option<String>,
    ) -> Result<(), BookError> {
        let mut rows = self.rows();
        let Some(entry) = rows.get_mut(address) else {
            return Ok(());
        };
        entry.last = Some(Outcome {
            kind,
            detail,
            at: SystemTime::now(),
        });
        let entry = entry.clone();
        self.write(address, Some(&entry), false)
    }

    /// Removes `address`; durable. `Ok(false)` if it was not in the book.
    pub fn remove(&self, address: &str) -> Result<bool, BookError> {
        let mut rows = self.rows();
        if !rows.contains_key(address) {
            return Ok(false);
        }
        self.write(address, None, true)?;
        rows.remove(address);
        Ok(true)
    }

    /// Without the `redb` feature the book is in memory only: nothing to write.
    #[cfg(not(feature = "redb"))]
    fn write(&self, _: &str, _: Option<&BookEntry>, _: bool) -> Result<(), BookError> {
        Ok(())
    }

    /// Makes every earlier write durable (one fsync).
    #[cfg(feature = "redb")]
    pub fn flush(&self) -> Result<(), BookError> {
        let Some(db) = &self.inner.db else {
            return Ok(());
        };
        let _rows = self.rows();
        let tx = db.begin_write().map_err(store_err)?;
        tx.commit().map_err(store_err)
    }

    /// Makes every earlier write durable: without the `redb` feature the book is in memory
    /// only, so there is nothing to do.
    #[cfg(not(feature = "redb"))]
    pub fn flush(&self) -> Result<(), BookError> {
        Ok(())
    }
}

#[cfg(all(test, feature = "redb"))]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_the_file_with_data_and_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("book.redb");
        let mut data = Object::new();
        data.insert("name", Value::from("alice"));
        data.insert("n", Value::from(3));
        {
            let book = PeerBook::open(&path).unwrap();
            book.put("net:h:1", BookState::Kept, data.clone()).unwrap();
            book.put("net:h:2", BookState::Staged, Object::new())
                .unwrap();
            book.put("net:h:3", BookState::Kept, Object::new()).unwrap();
            book.record(
                "net:h:1",
                OutcomeKind::ConnectingFailed,
                Some("refused".into()),
            )
            .unwrap();
            assert!(book.remove("net:h:3").unwrap());
            assert!(!book.remove("net:h:3").unwrap());
            // Not in the book: nothing recorded, no row made.
            book.record("net:h:9", OutcomeKind::Connected, None)
                .unwrap();
            book.flush().unwrap();
        }
        let book = PeerBook::open(&path).unwrap();
        assert_eq!(book.len(), 2);
        let one = book.get("net:h:1").unwrap();
        assert_eq!(one.state, BookState::Kept);
        assert_eq!(one.data, data);
        let last = one.last.unwrap();
        assert_eq!(last.kind, OutcomeKind::ConnectingFailed);
        assert_eq!(last.detail.as_deref(), Some("refused"));
        assert_eq!(book.in_state(BookState::Staged).len(), 1);
        assert!(book.set_state("net:h:2", BookState::Known).unwrap());
        assert!(!book.set_state("net:h:9", BookState::Known).unwrap());
        drop(book);
        let book = PeerBook::open(&path).unwrap();
        assert_eq!(book.get("net:h:2").unwrap().state, BookState::Known);
    }

    #[test]
    fn a_row_that_is_not_a_record_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("book.redb");
        {
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(PEERS)
                .unwrap()
                .insert("net:h:1", "not json")
                .unwrap();
            tx.commit().unwrap();
        }
        match PeerBook::open(&path) {
            Err(BookError::Corrupt { address, .. }) => assert_eq!(address, "net:h:1"),
            other => panic!("expected a corrupt row, got {other:?}"),
        }
    }
}
