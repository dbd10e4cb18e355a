//! When a verification may write `last_used_at`, and the locks that write
//! needs, taken only if they are free at once: a verification never waits.

use pgrx::prelude::*;

/// Whether this call may write `last_used_at`: never when the write could
/// raise or hold a row lock past the caller's statement.
///
/// - Not inside a transaction block (`BEGIN ... COMMIT`, or several
///   statements sent as one query string): the row lock of the write would
///   last until that transaction ends, and a revoke of the key would wait
///   for it while the key keeps verifying. Alone in its transaction, the
///   verification's statement is the whole transaction.
/// - Not in parallel mode, where PostgreSQL cannot assign a transaction id.
/// - Not read-only, not on a standby, and not under a transaction snapshot
///   (REPEATABLE READ or SERIALIZABLE), where touching a row another
///   session just touched would raise a serialization failure.
pub(crate) fn may_write_last_used() -> bool {
    may_spend_credits()
        // SAFETY: reads backend-local transaction state.
        && unsafe {
            !pg_sys::IsTransactionBlock()
                && pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32
        }
}

/// Whether this call may spend a key's credits, which updates its row in the
/// caller's transaction, inside a transaction block too: not in parallel
/// mode, a read-only transaction or on a standby, where the UPDATE would
/// raise. Such a call fails closed (`usage_unavailable`).
pub(crate) fn may_spend_credits() -> bool {
    // SAFETY: reads backend-local transaction state.
    unsafe { !pg_sys::IsInParallelMode() && !pg_sys::XactReadOnly && !pg_sys::RecoveryInProgress() }
}

/// Takes `RowExclusiveLock` on `table`, its indexes, its TOAST table and
/// that table's index only if each is free at once; false (the write is
/// skipped) if any is not. The UPDATE then finds every lock it needs
/// already held, and waits for none. Locks taken stay until the transaction
/// ends, as the UPDATE's would.
///
/// # Safety
/// Inside a transaction; `table` is a table's oid (or a dropped one).
pub(super) unsafe fn lock_for_write_without_waiting(table: pg_sys::Oid) -> bool {
    // SAFETY: the caller's contract.
    unsafe { lock_with_indexes_without_waiting(table, true) }
}

/// # Safety
/// As for [`lock_for_write_without_waiting`].
unsafe fn lock_with_indexes_without_waiting(relation: pg_sys::Oid, with_toast: bool) -> bool {
    let mode = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    // SAFETY: the relation is opened only after its lock is held (or not at
    // all if it was dropped meanwhile), and closed before its index list is used.
    unsafe {
        if !pg_sys::ConditionalLockRelationOid(relation, mode) {
            return false;
        }
        let rel = pg_sys::try_relation_open(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return false;
        }
        let indexes = pgrx::PgList::<pg_sys::Oid>::from_pg(pg_sys::RelationGetIndexList(rel));
        let toast = (*(*rel).rd_rel).reltoastrelid;
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        indexes
            .iter_oid()
            .all(|index| pg_sys::ConditionalLockRelationOid(index, mode))
            && (!with_toast
                || toast == pg_sys::InvalidOid
                || lock_with_indexes_without_waiting(toast, false))
    }
}

/// Whether this server is a standby (or still replaying WAL): nothing can
/// be written, so nothing is recorded as owed to `last_used_at`.
pub(crate) fn in_recovery() -> bool {
    // SAFETY: reads shared recovery state, as any backend may.
    unsafe { pg_sys::RecoveryInProgress() }
}
