//! The nexus's side of the durable in-sync record: what it tells the keeper of the record
//! (the control process, reached through cairn-node) each time its in-sync set changes, and
//! which replicas a new nexus may trust as sources.
//!
//! A nexus created with a recorder makes a generation raise durable only once the recorder
//! has accepted the report that carries it: every in-sync child stored the generation *and*
//! the record names exactly those children as in sync. Until then the writes that completed
//! after the raise are held (never acknowledged, never failed), so a replica that missed an
//! acknowledged write is out of the record before any client learns of that write. A
//! recorder that cannot be reached leaves the raise pending and the monitor tries again; one
//! that answers that a newer nexus exists fences this one (`docs/replication.md`, "Data
//! generations"; `docs/control.md`, "The durable in-sync set").
//!
//! Nothing here runs on a reactor: reports are sent by the manager's control threads.

use super::ChildSpec;
use std::sync::Arc;

/// Whether a replica holds every acknowledged write, as a report names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaSync {
    /// In sync and holding the report's generation.
    InSync,
    /// Faulted, being resynced or rebuilt, or in sync without the current generation yet.
    OutOfSync,
}

/// One report of a nexus's in-sync set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InSyncReport {
    /// The nexus's epoch: a record of a higher epoch refuses the report.
    pub epoch: u64,
    /// The data generation every in-sync replica of the report holds durably.
    pub generation: u64,
    /// Every child of the nexus, as given at create or add ("local" or HOST:PORT).
    pub replicas: Vec<(String, ReplicaSync)>,
}

impl InSyncReport {
    /// How many replicas the report names in sync.
    pub fn in_sync_count(&self) -> usize {
        self.replicas
            .iter()
            .filter(|(_, s)| *s == ReplicaSync::InSync)
            .count()
    }
}

/// Why a report was not recorded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not recorded this time (unreachable, an error answer): the nexus tries again and its
    /// held writes keep waiting.
    #[error("not recorded: {0}")]
    NotRecorded(String),
    /// The record belongs to a newer nexus (a higher epoch): this one fences itself.
    #[error("superseded: {0}")]
    Superseded(String),
}

/// Keeps the durable in-sync record of one volume. Blocking; called on control threads only.
pub trait InSyncRecorder: Send + Sync + std::fmt::Debug {
    /// Records `report`; Ok only once the record is durable.
    fn record(&self, report: &InSyncReport) -> Result<(), RecordError>;
}

/// What a new nexus is told about the volume's record (`CreateNexusRequest` fields
/// `control_volume`, `trusted`, `min_generation`).
#[derive(Clone, Debug, Default)]
pub struct InSyncOptions {
    /// When not empty, only these replicas may be sources: any other is rebuilt in full.
    pub trusted: Vec<ChildSpec>,
    /// A replica whose stored generation is below this is never a source.
    pub min_generation: u64,
    /// Where the nexus reports every change of its in-sync set; none: no record is kept.
    pub recorder: Option<Arc<dyn InSyncRecorder>>,
}

impl InSyncOptions {
    /// Whether `spec`, holding `generation`, may be a source of a new nexus.
    pub fn may_source(&self, spec: &ChildSpec, generation: u64) -> bool {
        generation >= self.min_generation
            && (self.trusted.is_empty() || self.trusted.contains(spec))
    }
}
