//! The snapshot a verification reads a key's row with.

use pgrx::prelude::*;

use super::unguarded;

/// The snapshot a verification reads the key's row with.
///
/// A key's row is read as of the call, whatever the caller's isolation
/// level, the way foreign-key checks read with a fresh snapshot: a revoke,
/// a rotation or an expiry committed by another session counts at once,
/// even inside a REPEATABLE READ or SERIALIZABLE transaction that began
/// before it. The caller's own earlier commands stay visible (the snapshot
/// is taken after a command-counter increment, as SPI does for a volatile
/// function), so a transaction sees the keys it issued and revoked itself.
///
/// In parallel mode (a wrapper marked PARALLEL SAFE, in the leader or a
/// worker) PostgreSQL allows neither a new snapshot nor a command-counter
/// increment: the query's own snapshot serves there.
#[derive(Clone, Copy)]
pub(super) struct ReadSnapshot {
    snapshot: pg_sys::Snapshot,
    /// Registered and pushed by [`ReadSnapshot::take`]; ended by `release`.
    ours: bool,
}

impl ReadSnapshot {
    /// Takes the snapshot and makes it the active one (registered, so that
    /// nothing it can see is pruned while the scan uses it).
    ///
    /// # Safety
    /// Calls Postgres without a guard: run it inside
    /// `pg_guard_ffi_boundary` with only plain values on the stack, and
    /// pair it with [`ReadSnapshot::release`] in the same transaction.
    pub(super) unsafe fn take() -> ReadSnapshot {
        use unguarded::*;
        // SAFETY: the caller's contract.
        unsafe {
            if IsInParallelMode() {
                let snapshot = if ActiveSnapshotSet() {
                    GetActiveSnapshot()
                } else {
                    GetTransactionSnapshot()
                };
                return ReadSnapshot {
                    snapshot,
                    ours: false,
                };
            }
            CommandCounterIncrement();
            let snapshot = RegisterSnapshot(GetLatestSnapshot());
            PushActiveSnapshot(snapshot);
            ReadSnapshot {
                snapshot,
                ours: true,
            }
        }
    }

    pub(super) fn get(&self) -> pg_sys::Snapshot {
        self.snapshot
    }

    /// # Safety
    /// As for [`ReadSnapshot::take`]; `self` came from it, in this transaction.
    pub(super) unsafe fn release(self) {
        use unguarded::*;
        if self.ours {
            // SAFETY: the caller's contract; it is the active snapshot we pushed.
            unsafe {
                PopActiveSnapshot();
                UnregisterSnapshot(self.snapshot);
            }
        }
    }
}
