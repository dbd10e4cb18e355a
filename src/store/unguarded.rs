//! Postgres functions of the probe, declared here without pgrx's per-call
//! guard: the probe (`probe.rs`) calls them in two guarded steps instead of one guard
//! (a `sigsetjmp`) per call, which cost a measurable part of a
//! verification. Inside
//! those steps only raw pointers and plain values live on the stack, so an
//! error raised by Postgres skips no destructor (pgrx's rule for
//! `pg_guard_ffi_boundary`).

use pgrx::pg_sys::*;
use std::ffi::{c_char, c_int};

/// Declares each function without pgrx's guard, and checks at compile
/// time that pgrx's binding of it, generated from the headers of the
/// major being built, has exactly this signature: a major that changes
/// one is a compile error, never a silent call with the wrong arguments.
macro_rules! unguarded {
    ($($(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        unsafe extern "C-unwind" {
            $($(#[$attr])* pub(super) fn $name($($arg: $ty),*) $(-> $ret)?;)*
        }
        #[allow(dead_code)]
        fn same_signatures_as_pgrx() {
            $($(#[$attr])* {
                let _: unsafe fn($($ty),*) $(-> $ret)? = pgrx::pg_sys::$name;
            })*
        }
    };
}

unguarded! {
    fn relation_open(relationId: Oid, lockmode: LOCKMODE) -> Relation;
    fn relation_close(relation: Relation, lockmode: LOCKMODE);
    fn CommandCounterIncrement();
    fn IsInParallelMode() -> bool;
    fn ActiveSnapshotSet() -> bool;
    fn GetTransactionSnapshot() -> Snapshot;
    fn GetLatestSnapshot() -> Snapshot;
    fn RegisterSnapshot(snapshot: Snapshot) -> Snapshot;
    fn UnregisterSnapshot(snapshot: Snapshot);
    fn PushActiveSnapshot(snapshot: Snapshot);
    fn GetActiveSnapshot() -> Snapshot;
    fn PopActiveSnapshot();
    fn cstring_to_text_with_len(s: *const c_char, len: c_int) -> *mut text;
    fn ScanKeyEntryInitialize(
        entry: ScanKey,
        flags: c_int,
        attributeNumber: AttrNumber,
        strategy: StrategyNumber,
        subtype: Oid,
        collation: Oid,
        procedure: RegProcedure,
        argument: Datum,
    );
    #[cfg(not(feature = "pg18"))]
    fn index_beginscan(
        heapRelation: Relation,
        indexRelation: Relation,
        snapshot: Snapshot,
        nkeys: c_int,
        norderbys: c_int,
    ) -> IndexScanDesc;
    // 18 added the scan's instrumentation (NULL: none).
    #[cfg(feature = "pg18")]
    fn index_beginscan(
        heapRelation: Relation,
        indexRelation: Relation,
        snapshot: Snapshot,
        instrument: *mut IndexScanInstrumentation,
        nkeys: c_int,
        norderbys: c_int,
    ) -> IndexScanDesc;
    fn index_rescan(
        scan: IndexScanDesc,
        keys: ScanKey,
        nkeys: c_int,
        orderbys: ScanKey,
        norderbys: c_int,
    );
    fn index_getnext_slot(
        scan: IndexScanDesc,
        direction: ScanDirection::Type,
        slot: *mut TupleTableSlot,
    ) -> bool;
    fn index_endscan(scan: IndexScanDesc);
    fn table_slot_create(rel: Relation, reglist: *mut *mut List) -> *mut TupleTableSlot;
    fn ExecDropSingleTupleTableSlot(slot: *mut TupleTableSlot);
    fn slot_getsomeattrs_int(slot: *mut TupleTableSlot, attnum: c_int);
}
