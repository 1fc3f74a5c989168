//! Raft storage on sled: the log and vote in one pair of trees, the state machine and its
//! snapshot in others, all in one sled database under the node's data dir.
//!
//! Durability rules (what openraft relies on):
//! - `append` writes the entries (several as one batch) and reports them flushed only after a flush
//!   that started after the write has completed. Flushes are group commits: one background
//!   task flushes for every append that arrived while the previous flush ran, so concurrent
//!   appends share a flush instead of queueing for one each (openraft 0.9 waits for each
//!   append's flush before its next command, so today the client writes batched into one
//!   entry by `cluster.rs` are what share a flush);
//! - a flush is [`Durable::flush`]: sled's own flush, then `fdatasync`, because sled's flush
//!   alone does not survive a power cut (see there);
//! - `save_vote` flushes before returning;
//! - the state machine writes its data and `last_applied` in one atomic batch, so they never
//!   disagree, once per many applied entries (`WRITE_AFTER_ENTRIES`, `WRITE_AFTER_KEYS`), before
//!   a snapshot is stored, and on a clean stop; it does not flush on its own: the log is the
//!   source of truth and applied entries not yet written are re-applied from it on restart.
//!   A snapshot is flushed, with the state machine written before it, before the log is purged.
//!
//! sled stays behind this module: nothing outside it sees a sled type.

// openraft's trait methods return its (large) `StorageError`; our helpers return the same
// type so `?` flows through without conversions.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Debug;
use std::fs::File;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::access::{ApiKeyRecord, AuditEntry};
use crate::bootstrap::BootstrapState;
use crate::jobs::{JobRecord, TrainerInfo};
use crate::state::{ClusterState, IssuedToken, KvEntry, Touched, UsedToken};
use crate::types::{CommandResult, MemberRecord, NodeId, RaftNode, TypeConfig};

/// Largest snapshot we accept from a leader (the state is bounded by the kv quota).
pub const MAX_SNAPSHOT_SIZE: usize = 128 * 1024 * 1024;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";
const APPLIED: &[u8] = b"_applied";
const MEMBERSHIP: &[u8] = b"_membership";
const CLUSTER_ID: &[u8] = b"c";
const CLUSTER_KEY: &[u8] = b"ck";
const REVISION: &[u8] = b"r";
const SNAPSHOT_META: &[u8] = b"meta";
const BOOTSTRAP_TREE: &str = "bootstrap";
const BOOTSTRAP_STATE: &[u8] = b"state";
const SNAPSHOT_DATA: &[u8] = b"data";

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail, and our types always serialize.
    if let Err(e) = ciborium::into_writer(value, &mut out) {
        tracing::error!(error = %e, "CBOR encoding failed");
    }
    out
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ciborium::de::Error<std::io::Error>> {
    ciborium::from_reader(bytes)
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// Makes a sled database's writes durable. sled 0.34's `flush` writes its buffers and waits
/// for the device to take them (`sync_file_range`), which is enough to survive the process
/// being killed but not a power cut: it neither asks the device to empty its write cache nor
/// syncs the file's length, and values sled keeps in files of their own (`blobs/`, items over
/// ~128 KiB) are not synced at all. [`Durable::flush`] syncs blob files, then runs sled's
/// flush, syncs blob files again (and their directory), then `fdatasync`s the main file.
///
/// Syncing blobs before sled's flush makes a blob written before the flush durable before
/// the record pointing at it can be; a blob another thread writes while the flush runs can
/// still reach the disk after its record (sled's own background flusher can write the record
/// at any time). Closing that would take a change inside sled.
#[derive(Clone)]
pub struct Durable {
    db: sled::Db,
    file: Arc<File>,
    blobs: Arc<BlobSync>,
}

/// Blob files already synced, with the length each had when it was: sled writes a blob file
/// in several steps and only ever appends, so a file seen mid-write is synced again once its
/// length has changed.
struct BlobSync {
    dir: PathBuf,
    synced: Mutex<HashMap<OsString, u64>>,
}

impl Durable {
    /// The database `db` opened at `dir` (sled keeps its log in `dir/db` and large values
    /// in `dir/blobs/`). Syncs what is there now.
    pub fn new(db: sled::Db, dir: &Path) -> std::io::Result<Self> {
        let file = File::open(dir.join("db"))?;
        let durable = Self {
            db,
            file: Arc::new(file),
            blobs: Arc::new(BlobSync {
                dir: dir.join("blobs"),
                synced: Mutex::default(),
            }),
        };
        durable.sync_blobs()?;
        durable.file.sync_all()?;
        Ok(durable)
    }

    /// The database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Flushes everything written so far to stable storage. Blocks: call it from a blocking
    /// thread, or through [`Durable::flush`].
    pub fn flush_blocking(&self) -> Result<(), sled::Error> {
        self.sync_blobs()?;
        self.db.flush()?;
        self.sync_blobs()?;
        self.file.sync_data()?;
        Ok(())
    }

    /// [`Durable::flush_blocking`] on a blocking thread. Not sled's `flush_async`: that waits
    /// on sled's own small thread pool, and enough concurrent waiters (blob puts beside Raft
    /// appends) fill the pool with threads blocked on log writes that need a pool thread to
    /// finish: a deadlock.
    pub async fn flush(&self) -> Result<(), sled::Error> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.flush_blocking())
            .await
            .map_err(|e| sled::Error::ReportableBug(format!("flush task: {e}")))?
    }

    /// Syncs blob files that appeared, or grew, since they were last synced, then the
    /// directory that names them. Names of files sled has since removed are forgotten.
    fn sync_blobs(&self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashMap::new();
        for entry in entries {
            let entry = entry?;
            match entry.metadata() {
                Ok(meta) => {
                    present.insert(entry.file_name(), meta.len());
                }
                // Removed by sled since the listing: nothing to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let mut synced = self.blobs.synced.lock().unwrap_or_else(|e| e.into_inner());
        synced.retain(|name, _| present.contains_key(name));
        let mut new_names = false;
        for (name, len) in present {
            if synced.get(&name) == Some(&len) {
                continue;
            }
            match File::open(self.blobs.dir.join(&name)) {
                Ok(f) => {
                    // The length before the sync: whatever is appended later shows as growth.
                    let len = f.metadata()?.len();
                    f.sync_all()?;
                    new_names |= synced.insert(name, len).is_none();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if new_names {
            File::open(&self.blobs.dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The persistent half of a Raft node: open it once per data dir.
pub struct Storage {
    durable: Durable,
    /// The state machine handed out by `split`, so `flush` can write what it holds.
    state_machine: Mutex<Option<StateMachineStore>>,
}

impl Storage {
    /// Opens (or creates) the Raft database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, sled::Error> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(Self {
            durable: Durable::new(db, dir)?,
            state_machine: Mutex::default(),
        })
    }

    /// The log store and the state machine, for `openraft::Raft::new`. Must be called
    /// within a tokio runtime (it starts the log's flusher task).
    pub fn split(&self) -> Result<(LogStore, StateMachineStore), StorageError<NodeId>> {
        let (flusher, queue) = tokio::sync::mpsc::channel(FLUSH_QUEUE);
        tokio::spawn(group_commit(self.durable.clone(), queue));
        let log = LogStore {
            durable: self.durable.clone(),
            log: self.durable.db.open_tree("raft_log").map_err(read_err)?,
            meta: self.durable.db.open_tree("raft_meta").map_err(read_err)?,
            flusher,
        };
        let sm = StateMachineStore::open(self.durable.clone())?;
        *self.state_machine.lock().map_err(|_| poisoned())? = Some(sm.clone());
        Ok((log, sm))
    }

    /// Whether this data dir holds any Raft state (a vote or log entries): a node that has
    /// ever been part of a cluster must never found a new one.
    pub fn has_state(&self) -> bool {
        let has = |tree: &str, key: Option<&[u8]>| {
            self.durable.db.open_tree(tree).is_ok_and(|t| match key {
                Some(k) => t.contains_key(k).unwrap_or(false),
                None => !t.is_empty(),
            })
        };
        has("raft_meta", Some(VOTE)) || has("raft_log", None)
    }

    /// Writes the state machine's unwritten changes, then flushes everything to disk (on a
    /// blocking thread), so that a restart after a clean stop has nothing to re-apply.
    pub async fn flush(&self) -> Result<(), sled::Error> {
        let sm = self.state_machine.lock().ok().and_then(|sm| sm.clone());
        if let Some(sm) = sm {
            let written = sm
                .applied
                .read()
                .map_err(|_| poisoned())
                .and_then(|applied| sm.write_unwritten(&applied));
            if let Err(e) = written {
                tracing::warn!(error = %e, "writing the state machine");
            }
        }
        self.durable.flush().await
    }

    /// What this node promised while waiting to found (see `bootstrap.rs`). An unreadable
    /// promise is an error: forgetting it could let this node promise twice.
    pub(crate) fn load_bootstrap(&self) -> Result<BootstrapState, String> {
        let tree = self
            .durable
            .db
            .open_tree(BOOTSTRAP_TREE)
            .map_err(|e| e.to_string())?;
        match tree.get(BOOTSTRAP_STATE).map_err(|e| e.to_string())? {
            Some(bytes) => decode(&bytes).map_err(|e| format!("unreadable bootstrap state: {e}")),
            None => Ok(BootstrapState::default()),
        }
    }

    /// Saves the bootstrap state and returns once it is on disk: a promise must survive a
    /// crash before it is given.
    pub(crate) async fn save_bootstrap(&self, state: &BootstrapState) -> Result<(), sled::Error> {
        self.durable
            .db
            .open_tree(BOOTSTRAP_TREE)?
            .insert(BOOTSTRAP_STATE, encode(state))?;
        self.durable.flush().await
    }
}

/// Flushes on a blocking thread (not sled's `flush_async`, see [`Durable::flush`]), as far as
/// sled's own flush goes: enough to survive the process being killed, not a power cut (see
/// [`Durable`]). For data no client was promised.
pub async fn flush_tree(tree: &sled::Tree) -> Result<(), sled::Error> {
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || tree.flush().map(|_| ()))
        .await
        .map_err(|e| sled::Error::ReportableBug(format!("flush task: {e}")))?
}

/// Appends waiting for the group-commit flusher; bounds how far the log runs ahead of disk.
const FLUSH_QUEUE: usize = 4096;

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    durable: Durable,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: tokio::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// Flushes the database for every batch of appends queued while the previous flush ran, then
/// tells openraft, in order, that those entries are on disk.
async fn group_commit(
    durable: Durable,
    mut queue: tokio::sync::mpsc::Receiver<LogFlushed<TypeConfig>>,
) {
    let mut waiting = Vec::new();
    while let Some(first) = queue.recv().await {
        waiting.push(first);
        while let Ok(more) = queue.try_recv() {
            waiting.push(more);
        }
        let result = durable.flush().await.map_err(|e| e.to_string());
        for callback in waiting.drain(..) {
            callback.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }
}

impl LogStore {
    fn meta_get<T: DeserializeOwned>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        match self.meta.get(key).map_err(read_err)? {
            Some(bytes) => Ok(Some(decode(&bytes).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    async fn flush(&self) -> Result<(), sled::Error> {
        self.durable.flush().await
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range::<[u8; 8], _>((start, end)) {
            let (_, bytes) = item.map_err(read_err)?;
            out.push(decode(&bytes).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.meta_get(LAST_PURGED)?;
        let last = match self.log.last().map_err(read_err)? {
            Some((_, bytes)) => {
                let entry: Entry<TypeConfig> = decode(&bytes).map_err(read_err)?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.meta.insert(VOTE, encode(vote)).map_err(write_err)?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.meta_get(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not flushed: a lost committed index only means re-reading it from the leader.
        self.meta
            .insert(COMMITTED, encode(&committed))
            .map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.meta_get::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // One entry (the common case: the leader proposes one batch of client writes at a
        // time) is a plain insert. A sled batch would cost two more writes of sled's IO
        // buffer, each on sled's thread pool: its `apply_batch` seals the current buffer
        // before and after reserving the batch's marker.
        let mut entries = entries.into_iter();
        let first = entries.next();
        match (first, entries.next()) {
            (None, _) => {}
            (Some(entry), None) => {
                self.log
                    .insert(index_key(entry.log_id.index), encode(&entry))
                    .map_err(|e| StorageIOError::write_logs(&e))?;
            }
            (Some(first), Some(second)) => {
                let mut batch = sled::Batch::default();
                for entry in [first, second].into_iter().chain(entries) {
                    batch.insert(&index_key(entry.log_id.index), encode(&entry));
                }
                self.log
                    .apply_batch(batch)
                    .map_err(|e| StorageIOError::write_logs(&e))?;
            }
        }
        // The entries are in sled's buffers; the flusher makes them durable and only then
        // acknowledges them.
        if let Err(e) = self.flusher.send(callback).await {
            e.0.log_io_completed(Err(std::io::Error::other("the log flusher has stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(index_key(log_id.index)..) {
            let (key, _) = item.map_err(read_err)?;
            batch.remove(key);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first: a crash half-way leaves extra entries, never a gap.
        self.meta
            .insert(LAST_PURGED, encode(&log_id))
            .map_err(write_err)?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=index_key(log_id.index)) {
            let (key, _) = item.map_err(read_err)?;
            batch.remove(key);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

/// What the state machine holds in memory (and mirrors in sled).
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The replicated state.
    pub(crate) state: ClusterState,
    /// Last applied log id.
    pub(crate) last_applied: Option<LogId<NodeId>>,
    /// Last applied membership.
    pub(crate) membership: StoredMembership<NodeId, RaftNode>,
}

/// Shared read access to the applied state.
pub(crate) type SharedState = Arc<RwLock<Applied>>;

/// The state machine: applies committed commands, builds and installs snapshots.
#[derive(Clone)]
pub struct StateMachineStore {
    durable: Durable,
    sm: sled::Tree,
    snapshot: sled::Tree,
    /// Held while a snapshot is compared with the stored one and written.
    snapshot_write: Arc<Mutex<()>>,
    applied: SharedState,
    /// Applied changes not yet written to sled. Locked only while `applied` is held.
    unwritten: Arc<Mutex<Unwritten>>,
}

/// What applies changed since the state machine was last written to sled.
#[derive(Debug, Default)]
struct Unwritten {
    /// The keys they changed (repeats are removed when written).
    touched: Vec<Touched>,
    /// How many log entries they covered.
    entries: u64,
    /// A write failed: the keys it was to write are gone from `touched`, so no later write
    /// may record a newer `last_applied` (it would claim changes the trees do not hold).
    failed: bool,
}

/// The state machine is written to sled after this many applied entries...
const WRITE_AFTER_ENTRIES: u64 = 1024;
/// ...or once this many key changes are waiting, whichever comes first. Together they bound
/// what a restart re-applies from the log.
const WRITE_AFTER_KEYS: usize = 1024;

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, RaftNode>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

fn member_key(id: NodeId) -> Vec<u8> {
    let mut k = b"m".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn kv_key(key: &str) -> Vec<u8> {
    let mut k = b"k".to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

fn job_key(id: &str) -> Vec<u8> {
    let mut k = b"j".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn trainer_key(id: NodeId) -> Vec<u8> {
    let mut k = b"w".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn api_key_key(id: &str) -> Vec<u8> {
    let mut k = b"p".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn audit_key(seq: u64) -> Vec<u8> {
    let mut k = b"a".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn issued_key(nonce: &[u8]) -> Vec<u8> {
    let mut k = b"i".to_vec();
    k.extend_from_slice(nonce);
    k
}

fn token_key(nonce: &[u8]) -> Vec<u8> {
    let mut k = b"t".to_vec();
    k.extend_from_slice(nonce);
    k
}

impl StateMachineStore {
    fn open(durable: Durable) -> StorageResult<Self> {
        let db = &durable.db;
        let sm = db.open_tree("raft_sm").map_err(read_err)?;
        let snapshot = db.open_tree("raft_snapshot").map_err(read_err)?;
        let mut applied = Applied::default();
        for item in sm.iter() {
            let (key, value) = item.map_err(read_err)?;
            match key.as_ref() {
                APPLIED => applied.last_applied = decode(&value).map_err(read_err)?,
                MEMBERSHIP => applied.membership = decode(&value).map_err(read_err)?,
                CLUSTER_ID => applied.state.cluster_id = Some(decode(&value).map_err(read_err)?),
                CLUSTER_KEY => applied.state.cluster_key = Some(value.to_vec()),
                REVISION => applied.state.revision = decode(&value).map_err(read_err)?,
                [b'm', ..] => {
                    let m: MemberRecord = decode(&value).map_err(read_err)?;
                    applied.state.members.insert(m.node_id, m);
                }
                [b'k', rest @ ..] => {
                    let k = String::from_utf8(rest.to_vec()).map_err(read_err)?;
                    let e: KvEntry = decode(&value).map_err(read_err)?;
                    applied.state.kv.insert(k, e);
                }
                [b't', rest @ ..] => {
                    let u: UsedToken = decode(&value).map_err(read_err)?;
                    applied.state.used_tokens.insert(rest.to_vec(), u);
                }
                [b'i', rest @ ..] => {
                    let t: IssuedToken = decode(&value).map_err(read_err)?;
                    applied.state.issued_tokens.insert(rest.to_vec(), t);
                }
                [b'j', ..] => {
                    let j: JobRecord = decode(&value).map_err(read_err)?;
                    applied.state.jobs.insert(j.id.clone(), j);
                }
                [b'w', rest @ ..] => {
                    let id: [u8; 8] = rest
                        .try_into()
                        .map_err(|_| read_err(std::io::Error::other("malformed trainer key")))?;
                    let info: TrainerInfo = decode(&value).map_err(read_err)?;
                    applied
                        .state
                        .trainers
                        .insert(NodeId::from_be_bytes(id), info);
                }
                [b'p', ..] => {
                    let k: ApiKeyRecord = decode(&value).map_err(read_err)?;
                    applied.state.api_keys.insert(k.id.clone(), k);
                }
                [b'a', ..] => {
                    let e: AuditEntry = decode(&value).map_err(read_err)?;
                    applied.state.audit.insert(e.seq, e);
                }
                _ => {}
            }
        }
        applied.state.rebuild();
        let store = Self {
            durable,
            sm,
            snapshot,
            snapshot_write: Arc::default(),
            applied: Arc::new(RwLock::new(Applied::default())),
            unwritten: Arc::default(),
        };
        // The state machine is written after the snapshot that covers it, so the stored
        // snapshot is never newer than what is loaded above. Should it be, start from it:
        // the log before it may already be purged and could not be re-applied.
        if let Some(snap) = store.read_snapshot()? {
            if snap.meta.last_log_id > applied.last_applied {
                let signature = Some(snap.meta.signature());
                tracing::warn!(
                    snapshot = %snap.meta.snapshot_id,
                    "the stored snapshot is newer than the state machine; starting from it"
                );
                let mut state: ClusterState =
                    decode(&snap.data).map_err(|e| StorageIOError::read_snapshot(signature, &e))?;
                state.rebuild();
                applied = Applied {
                    state,
                    last_applied: snap.meta.last_log_id,
                    membership: snap.meta.last_membership,
                };
                // Rewritten whole: a later write of changed keys alone would leave keys
                // the snapshot no longer has beside a newer `last_applied`.
                store.write_whole(&applied)?;
            }
        }
        *store.applied.write().map_err(|_| poisoned())? = applied;
        Ok(store)
    }

    /// Shared read access to the applied state.
    pub(crate) fn shared(&self) -> SharedState {
        self.applied.clone()
    }

    /// Writes what applies changed since the last write to sled, with the last applied log
    /// id, in one atomic batch. Not flushed: the log holds every applied entry until a
    /// snapshot covers it, and a restart re-applies those after the state machine's
    /// `last_applied` (openraft does, up to the committed index it reads back).
    /// Must be called with `applied` locked.
    fn write_unwritten(&self, applied: &Applied) -> StorageResult<()> {
        let mut unwritten = self.unwritten.lock().map_err(|_| poisoned())?;
        if unwritten.failed {
            let e = std::io::Error::other("an earlier state machine write failed");
            return Err(StorageIOError::write_state_machine(&e).into());
        }
        if unwritten.entries == 0 && unwritten.touched.is_empty() {
            return Ok(());
        }
        let written = self.persist_with(sled::Batch::default(), applied, &mut unwritten.touched);
        unwritten.failed = written.is_err();
        unwritten.entries = 0;
        written
    }

    /// Replaces the whole state machine on disk with `new`: every stored key removed, then
    /// all of `new` written, in one atomic batch, so a crash in between cannot leave an
    /// empty or mixed state machine whose log is already purged.
    fn write_whole(&self, new: &Applied) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for item in self.sm.iter() {
            let (key, _) = item.map_err(read_err)?;
            batch.remove(key);
        }
        let mut touched: Vec<Touched> = vec![Touched::ClusterId, Touched::Revision];
        touched.extend(new.state.members.keys().map(|id| Touched::Member(*id)));
        touched.extend(new.state.kv.keys().map(|k| Touched::Kv(k.clone())));
        touched.extend(
            new.state
                .used_tokens
                .keys()
                .map(|n| Touched::Token(n.clone())),
        );
        touched.extend(
            new.state
                .issued_tokens
                .keys()
                .map(|n| Touched::Issued(n.clone())),
        );
        touched.extend(new.state.jobs.keys().map(|id| Touched::Job(id.clone())));
        touched.extend(new.state.trainers.keys().map(|id| Touched::Trainer(*id)));
        touched.extend(
            new.state
                .api_keys
                .keys()
                .map(|id| Touched::ApiKey(id.clone())),
        );
        touched.extend(new.state.audit.keys().map(|seq| Touched::Audit(*seq)));
        self.persist_with(batch, new, &mut touched)?;
        // Everything applies had changed is in what was just written.
        *self.unwritten.lock().map_err(|_| poisoned())? = Unwritten::default();
        Ok(())
    }

    /// Writes `batch` and what `touched` names of `applied` in one atomic batch (a later
    /// insert of a key overrides an earlier remove of it in `batch`).
    fn persist_with(
        &self,
        mut batch: sled::Batch,
        applied: &Applied,
        touched: &mut Vec<Touched>,
    ) -> StorageResult<()> {
        touched.sort();
        touched.dedup();
        for t in touched.drain(..) {
            match t {
                Touched::ClusterId => {
                    if let Some(id) = &applied.state.cluster_id {
                        batch.insert(CLUSTER_ID, encode(id));
                    }
                    match &applied.state.cluster_key {
                        Some(key) => batch.insert(CLUSTER_KEY, key.as_slice()),
                        None => batch.remove(CLUSTER_KEY),
                    }
                }
                Touched::Revision => batch.insert(REVISION, encode(&applied.state.revision)),
                Touched::Member(id) => match applied.state.members.get(&id) {
                    Some(m) => batch.insert(member_key(id), encode(m)),
                    None => batch.remove(member_key(id)),
                },
                Touched::Kv(key) => match applied.state.kv.get(&key) {
                    Some(e) => batch.insert(kv_key(&key), encode(e)),
                    None => batch.remove(kv_key(&key)),
                },
                Touched::Token(nonce) => match applied.state.used_tokens.get(&nonce) {
                    Some(u) => batch.insert(token_key(&nonce), encode(u)),
                    None => batch.remove(token_key(&nonce)),
                },
                Touched::Issued(nonce) => match applied.state.issued_tokens.get(&nonce) {
                    Some(t) => batch.insert(issued_key(&nonce), encode(t)),
                    None => batch.remove(issued_key(&nonce)),
                },
                Touched::Job(id) => match applied.state.jobs.get(&id) {
                    Some(j) => batch.insert(job_key(&id), encode(j)),
                    None => batch.remove(job_key(&id)),
                },
                Touched::Trainer(id) => match applied.state.trainers.get(&id) {
                    Some(t) => batch.insert(trainer_key(id), encode(t)),
                    None => batch.remove(trainer_key(id)),
                },
                Touched::ApiKey(id) => match applied.state.api_keys.get(&id) {
                    Some(k) => batch.insert(api_key_key(&id), encode(k)),
                    None => batch.remove(api_key_key(&id)),
                },
                Touched::Audit(seq) => match applied.state.audit.get(&seq) {
                    Some(e) => batch.insert(audit_key(seq), encode(e)),
                    None => batch.remove(audit_key(seq)),
                },
            }
        }
        batch.insert(APPLIED, encode(&applied.last_applied));
        batch.insert(MEMBERSHIP, encode(&applied.membership));
        self.sm
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(())
    }

    fn read_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        let meta = self.snapshot.get(SNAPSHOT_META).map_err(read_err)?;
        let data = self.snapshot.get(SNAPSHOT_DATA).map_err(read_err)?;
        match (meta, data) {
            (Some(meta), Some(data)) => Ok(Some(StoredSnapshot {
                meta: decode(&meta).map_err(read_err)?,
                data: data.to_vec(),
            })),
            _ => Ok(None),
        }
    }

    /// Stores `snap` unless a newer snapshot is already stored. A snapshot built here is
    /// encoded outside the apply lock, so one installed from the leader meanwhile (newer)
    /// can be stored first; the older one must not replace it.
    async fn write_snapshot(&self, snap: &StoredSnapshot) -> StorageResult<()> {
        let signature = Some(snap.meta.signature());
        {
            let _writing = self.snapshot_write.lock().map_err(|_| poisoned())?;
            if let Some(bytes) = self.snapshot.get(SNAPSHOT_META).map_err(read_err)? {
                let stored: SnapshotMeta<NodeId, RaftNode> = decode(&bytes).map_err(read_err)?;
                if stored.last_log_id > snap.meta.last_log_id {
                    tracing::debug!(
                        stored = %stored.snapshot_id,
                        built = %snap.meta.snapshot_id,
                        "a newer snapshot is stored; keeping it"
                    );
                    return Ok(());
                }
            }
            let mut batch = sled::Batch::default();
            batch.insert(SNAPSHOT_META, encode(&snap.meta));
            batch.insert(SNAPSHOT_DATA, snap.data.as_slice());
            self.snapshot
                .apply_batch(batch)
                .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
        }
        self.durable
            .flush()
            .await
            .map_err(|e| StorageIOError::write_snapshot(signature, &e))?;
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, RaftNode>)> {
        let applied = self.applied.read().map_err(|_| poisoned())?;
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied.write().map_err(|_| poisoned())?;
        let mut touched = Vec::new();
        let mut results = Vec::new();
        let mut count = 0;
        let mut membership_changed = false;
        for entry in entries {
            count += 1;
            membership_changed |= matches!(entry.payload, EntryPayload::Membership(_));
            applied.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Done,
                EntryPayload::Normal(cmd) => applied.state.apply(&cmd, &mut touched),
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResult::Done
                }
            };
            results.push(result);
        }
        // Written to sled in batches of many entries, not per apply: a sled batch costs two
        // writes of sled's IO buffer of its own, and the next log flush waits for them.
        // Membership and member records are written at once (they are rare): a node that
        // was removed must still know it after a crash, with nothing left to re-apply from.
        membership_changed |= touched.iter().any(|t| matches!(t, Touched::Member(_)));
        let due = {
            let mut unwritten = self.unwritten.lock().map_err(|_| poisoned())?;
            unwritten.touched.append(&mut touched);
            unwritten.entries += count;
            membership_changed
                || unwritten.entries >= WRITE_AFTER_ENTRIES
                || unwritten.touched.len() >= WRITE_AFTER_KEYS
        };
        if due {
            self.write_unwritten(&applied)?;
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RaftNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let signature = Some(meta.signature());
        if data.len() > MAX_SNAPSHOT_SIZE {
            let e = std::io::Error::other(format!("snapshot of {} bytes", data.len()));
            return Err(StorageIOError::read_snapshot(signature, &e).into());
        }
        let mut state: ClusterState =
            decode(&data).map_err(|e| StorageIOError::read_snapshot(signature.clone(), &e))?;
        state.rebuild();
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        // Persist the snapshot first: if we crash while replacing the state machine, the
        // snapshot is there to install again on restart.
        self.write_snapshot(&snap).await?;

        let mut applied = self.applied.write().map_err(|_| poisoned())?;
        let new = Applied {
            state,
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.write_whole(&new)?;
        *applied = new;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.read_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let started = std::time::Instant::now();
        // Only the copy holds the lock. Applies take the write lock, so while it is held every
        // commit waits; the encoding and the write, which grow with the state (CBOR encoding
        // is the slower part: ~7 ms per MB here), happen outside it. The copy costs a second
        // state in memory while the snapshot is built.
        let (state, last_applied, membership, locked) = {
            let applied = self.applied.read().map_err(|_| poisoned())?;
            let locked = started.elapsed();
            // The state machine on disk must be at least as new as the snapshot: the log
            // the snapshot covers can be purged once it is stored.
            self.write_unwritten(&applied)?;
            (
                applied.state.clone(),
                applied.last_applied,
                applied.membership.clone(),
                locked,
            )
        };
        let copied = started.elapsed();
        // CPU-bound: off the async workers, which carry the Raft and API tasks.
        let data = tokio::task::spawn_blocking(move || encode(&state))
            .await
            .map_err(|e| {
                StorageIOError::write_snapshot(None, &std::io::Error::other(e.to_string()))
            })?;
        let encoded = started.elapsed();
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.write_snapshot(&snap).await?;
        tracing::info!(
            bytes = snap.data.len(),
            lock_wait_ms = locked.as_millis() as u64,
            copy_ms = (copied - locked).as_millis() as u64,
            encode_ms = (encoded - copied).as_millis() as u64,
            write_ms = (started.elapsed() - encoded).as_millis() as u64,
            "raft snapshot built"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(snap.data)),
        })
    }
}

fn poisoned() -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&std::io::Error::other("state lock poisoned")).into()
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachineStore)> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            let storage = Storage::open(dir.path()).map_err(write_err)?;
            let (log, sm) = storage.split()?;
            Ok((dir, log, sm))
        }
    }

    /// Values sled keeps in files of their own are synced by a durable flush, once each
    /// unless they grow; nothing else would ever sync them.
    #[tokio::test]
    async fn durable_flush_syncs_blob_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let durable = storage.durable.clone();
        use std::collections::HashSet;
        let synced = || -> HashSet<OsString> {
            durable
                .blobs
                .synced
                .lock()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        let tree = storage.durable.db.open_tree("t").unwrap();
        tree.insert(b"small", vec![1u8; 100]).unwrap();
        durable.flush().await.unwrap();
        assert!(synced().is_empty(), "a small value stays in sled's log");

        tree.insert(b"big", vec![2u8; 300 << 10]).unwrap();
        durable.flush().await.unwrap();
        let files: HashSet<OsString> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!files.is_empty(), "a 300 KiB value is a blob file");
        assert_eq!(synced(), files);

        durable.flush().await.unwrap();
        assert_eq!(synced(), files, "nothing new to sync");

        // A file caught while sled was still writing it is synced again once it has grown.
        let name = files.iter().next().unwrap().clone();
        let path = dir.path().join("blobs").join(&name);
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(durable.blobs.synced.lock().unwrap()[&name], len);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"more").unwrap();
        durable.flush().await.unwrap();
        assert_eq!(durable.blobs.synced.lock().unwrap()[&name], len + 4);
    }

    fn kv_put_entry(index: u64, key: &str) -> Entry<TypeConfig> {
        use crate::types::Command;
        use openraft::CommittedLeaderId;
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(Command::KvPut {
                key: key.into(),
                value: index.to_string(),
                if_version: None,
            }),
        }
    }

    /// A snapshot built here is stored after its encoding, outside the apply lock; one
    /// installed from the leader in between is newer and must stay the current one.
    #[tokio::test]
    async fn an_older_snapshot_never_replaces_a_newer_one() -> StorageResult<()> {
        let dir = tempfile::tempdir().map_err(write_err)?;
        let storage = Storage::open(dir.path()).map_err(write_err)?;
        let (_log, mut sm) = storage.split()?;
        sm.apply([kv_put_entry(1, "a")]).await?;
        let older = sm.build_snapshot().await?;
        sm.apply([kv_put_entry(2, "b")]).await?;
        let newer = sm.build_snapshot().await?;
        assert!(newer.meta.last_log_id > older.meta.last_log_id);

        let stale = StoredSnapshot {
            meta: older.meta.clone(),
            data: older.snapshot.into_inner(),
        };
        sm.write_snapshot(&stale).await?;
        let current = sm.get_current_snapshot().await?.expect("a snapshot");
        assert_eq!(current.meta, newer.meta);
        Ok(())
    }

    /// Installing a snapshot replaces the whole state machine on disk, keys the snapshot
    /// does not have included, in one batch.
    #[tokio::test]
    async fn installed_snapshot_replaces_the_state_on_disk() -> StorageResult<()> {
        let source_dir = tempfile::tempdir().map_err(write_err)?;
        let source = Storage::open(source_dir.path()).map_err(write_err)?;
        let (_log, mut leader) = source.split()?;
        leader
            .apply([kv_put_entry(1, "kept"), kv_put_entry(2, "also")])
            .await?;
        let snap = leader.build_snapshot().await?;

        let dir = tempfile::tempdir().map_err(write_err)?;
        let storage = Storage::open(dir.path()).map_err(write_err)?;
        let (_log2, mut sm) = storage.split()?;
        sm.apply([kv_put_entry(1, "stale")]).await?;
        sm.install_snapshot(&snap.meta, snap.snapshot).await?;

        let on_disk = StateMachineStore::open(storage.durable.clone())?;
        let state = state_of(&on_disk);
        assert_eq!(
            state.kv.keys().cloned().collect::<Vec<_>>(),
            vec!["also".to_string(), "kept".to_string()]
        );
        let (applied, _) = on_disk.clone().applied_state().await?;
        assert_eq!(applied, snap.meta.last_log_id);
        Ok(())
    }

    #[test]
    fn openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
        Suite::test_all(Builder)
    }

    fn state_of(sm: &StateMachineStore) -> ClusterState {
        sm.shared()
            .read()
            .map(|a| a.state.clone())
            .unwrap_or_default()
    }

    /// API keys and the audit log (trimmed entries included) survive a reopen and travel in
    /// snapshots.
    #[tokio::test]
    async fn keys_and_audit_persist_and_snapshot() -> StorageResult<()> {
        use crate::access::{generate_api_key, ApiKeyCommand, AuditEntry, Role};
        use crate::types::Command;
        use openraft::CommittedLeaderId;

        let dir = tempfile::tempdir().map_err(write_err)?;
        let key = generate_api_key("ci", Role::Viewer, "local", 1);
        let note = AuditEntry::new(1, "local", "n", "token.issue", "t", "");
        let cmds = vec![
            Command::ApiKey(ApiKeyCommand::Create(key.record.clone())),
            Command::Audited {
                entry: note.clone(),
                cmd: Box::new(Command::ApiKey(ApiKeyCommand::Revoke {
                    id: key.record.id.clone(),
                    at_ms: 2,
                })),
            },
            Command::Audit(vec![note.clone(), note]),
        ];
        let storage = Storage::open(dir.path()).map_err(write_err)?;
        let (_log, mut sm) = storage.split()?;
        let entries = cmds.into_iter().enumerate().map(|(i, cmd)| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), i as u64 + 1),
            payload: EntryPayload::Normal(cmd),
        });
        sm.apply(entries).await?;
        let before = state_of(&sm);
        assert_eq!(before.api_keys[&key.record.id].revoked_at_ms, Some(2));
        assert_eq!(before.audit.len(), 3);

        // Loaded back from what is on disk after a clean stop (the database stays open: sled
        // holds its lock until its background threads end).
        storage.flush().await.map_err(write_err)?;
        let mut sm = StateMachineStore::open(storage.durable.clone())?;
        assert_eq!(state_of(&sm), before);

        let snap = sm.build_snapshot().await?;
        let other = tempfile::tempdir().map_err(write_err)?;
        let storage2 = Storage::open(other.path()).map_err(write_err)?;
        let (_log2, mut sm2) = storage2.split()?;
        sm2.install_snapshot(&snap.meta, snap.snapshot).await?;
        assert_eq!(state_of(&sm2), before);
        Ok(())
    }

    fn kv_keys(state: &ClusterState) -> Vec<String> {
        state.kv.keys().cloned().collect()
    }

    /// Applies are written to sled in batches, not one by one; a restart re-applies from
    /// the log what the state machine had not written, up to the saved committed index.
    #[tokio::test]
    async fn a_restart_reapplies_what_the_state_machine_had_not_written() -> StorageResult<()> {
        use openraft::storage::RaftLogStorageExt;
        use openraft::StorageHelper;

        let dir = tempfile::tempdir().map_err(write_err)?;
        let storage = Storage::open(dir.path()).map_err(write_err)?;
        let (mut log, mut sm) = storage.split()?;
        // Index 0 is where a cluster's log starts (its first membership).
        let first = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), 0),
            payload: EntryPayload::Blank,
        };
        let entries: Vec<_> = std::iter::once(first)
            .chain((1..=5).map(|i| kv_put_entry(i, &format!("k{i}"))))
            .collect();
        log.blocking_append(entries.clone()).await?;
        log.save_committed(Some(entries[5].log_id)).await?;
        for entry in entries {
            sm.apply([entry]).await?;
        }
        assert_eq!(kv_keys(&state_of(&sm)).len(), 5);

        // A crash now: what sled holds of the state machine is still empty.
        let mut restarted = StateMachineStore::open(storage.durable.clone())?;
        assert!(kv_keys(&state_of(&restarted)).is_empty());
        assert_eq!(restarted.applied_state().await?.0, None);

        // openraft's start-up re-applies the committed entries from the log.
        StorageHelper::new(&mut log, &mut restarted)
            .get_initial_state()
            .await?;
        assert_eq!(
            restarted.applied_state().await?.0.map(|id| id.index),
            Some(5)
        );
        assert_eq!(state_of(&restarted), state_of(&sm));
        Ok(())
    }

    /// Enough applied entries are written without waiting for a snapshot or a stop, so a
    /// restart never has more than that to re-apply.
    #[tokio::test]
    async fn the_state_machine_is_written_every_so_many_entries() -> StorageResult<()> {
        let dir = tempfile::tempdir().map_err(write_err)?;
        let storage = Storage::open(dir.path()).map_err(write_err)?;
        let (_log, mut sm) = storage.split()?;
        let on_disk = || -> StorageResult<Option<u64>> {
            let sm = StateMachineStore::open(storage.durable.clone())?;
            let applied = sm.applied.read().map_err(|_| poisoned())?.last_applied;
            Ok(applied.map(|id| id.index))
        };
        let blank = |index| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Blank,
        };
        // Entries that change no key: the entry count decides.
        for i in 1..WRITE_AFTER_ENTRIES {
            sm.apply([blank(i)]).await?;
        }
        assert_eq!(on_disk()?, None);
        sm.apply([blank(WRITE_AFTER_ENTRIES)]).await?;
        assert_eq!(on_disk()?, Some(WRITE_AFTER_ENTRIES));

        // A put changes two keys (the key and the revision): the key count decides.
        let puts = WRITE_AFTER_KEYS as u64 / 2;
        let first = WRITE_AFTER_ENTRIES + 1;
        for i in first..first + puts - 1 {
            sm.apply([kv_put_entry(i, &format!("k{i}"))]).await?;
        }
        assert_eq!(on_disk()?, Some(WRITE_AFTER_ENTRIES));
        sm.apply([kv_put_entry(first + puts - 1, "last")]).await?;
        assert_eq!(on_disk()?, Some(first + puts - 1));
        Ok(())
    }

    /// A clean stop (`Storage::flush`) and a built snapshot both write what is unwritten.
    #[tokio::test]
    async fn a_clean_stop_and_a_snapshot_write_the_state_machine() -> StorageResult<()> {
        let dir = tempfile::tempdir().map_err(write_err)?;
        let storage = Storage::open(dir.path()).map_err(write_err)?;
        let (_log, mut sm) = storage.split()?;
        sm.apply([kv_put_entry(1, "a")]).await?;
        storage.flush().await.map_err(write_err)?;
        let on_disk = StateMachineStore::open(storage.durable.clone())?;
        assert_eq!(kv_keys(&state_of(&on_disk)), vec!["a".to_string()]);

        sm.apply([kv_put_entry(2, "b")]).await?;
        let snap = sm.build_snapshot().await?;
        // Read from the tree itself: opening the store would start from the snapshot.
        let tree = storage.durable.db.open_tree("raft_sm").map_err(read_err)?;
        let applied: Option<LogId<NodeId>> =
            decode(&tree.get(APPLIED).map_err(read_err)?.expect("written")).map_err(read_err)?;
        assert_eq!(applied, snap.meta.last_log_id);
        assert!(tree.get(kv_key("b")).map_err(read_err)?.is_some());
        Ok(())
    }

    /// Should the stored snapshot ever be newer than the state machine on disk, a restart
    /// starts from the snapshot: the log it covers may be gone.
    #[tokio::test]
    async fn a_restart_starts_from_a_snapshot_newer_than_the_state_machine() -> StorageResult<()> {
        let other_dir = tempfile::tempdir().map_err(write_err)?;
        let other = Storage::open(other_dir.path()).map_err(write_err)?;
        let (_log, mut ahead) = other.split()?;
        ahead
            .apply([kv_put_entry(1, "x"), kv_put_entry(2, "y")])
            .await?;
        let snap = ahead.build_snapshot().await?;

        let dir = tempfile::tempdir().map_err(write_err)?;
        let storage = Storage::open(dir.path()).map_err(write_err)?;
        let (_log2, mut sm) = storage.split()?;
        sm.apply([kv_put_entry(1, "stale")]).await?;
        storage.flush().await.map_err(write_err)?;
        sm.write_snapshot(&StoredSnapshot {
            meta: snap.meta.clone(),
            data: snap.snapshot.into_inner(),
        })
        .await?;
        let mut restarted = StateMachineStore::open(storage.durable.clone())?;
        assert_eq!(state_of(&restarted), state_of(&ahead));
        let (applied, membership) = restarted.clone().applied_state().await?;
        assert_eq!(applied, snap.meta.last_log_id);
        assert_eq!(membership, snap.meta.last_membership);

        // The state machine on disk was replaced too: after one more write, a second
        // restart does not bring the key the snapshot did not have back.
        restarted.apply([kv_put_entry(3, "z")]).await?;
        restarted.build_snapshot().await?;
        let again = StateMachineStore::open(storage.durable.clone())?;
        assert_eq!(kv_keys(&state_of(&again)), ["x", "y", "z"]);
        Ok(())
    }
}
