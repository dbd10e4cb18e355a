//! The verification hot path: one probe of the unique index on `key_hash`,
//! straight through the access methods, without SPI or the executor.
//!
//! This is what an executor index scan node does for `WHERE key_hash = $1`,
//! minus planning, plan caching and executor start-up, which cost more than
//! the probe itself (docs/benchmark.md has the numbers). Visibility: see
//! [`ReadSnapshot`].

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::prelude::*;

use super::row::{credits_of, rate_limit_of, FoundKey, Reading};
use super::snapshot::ReadSnapshot;
use super::unguarded;
use crate::jsonb::StoredJsonb;

const TABLE: &CStr = c"api_keys";
const HASH_INDEX: &CStr = c"idx_api_keys_key_hash_unique";

/// Column positions (0-based) in `api_keys`, found by name: an adopted table
/// may have extra columns, and dropped columns leave gaps. The 0.2.0 columns
/// are missing while a database is still at 0.1.0 with this library loaded.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Columns {
    id: usize,
    user_id: usize,
    key_hash: usize,
    key_prefix: usize,
    name: usize,
    last_used_at: usize,
    revoked_at: usize,
    expires_at: Option<usize>,
    scopes: Option<usize>,
    metadata: Option<usize>,
    // 0.3.0, read by every verification when they exist.
    credits: Option<usize>,
    refill_amount: Option<usize>,
    refill_every: Option<usize>,
    refilled_at: Option<usize>,
    // 0.4.0, read by the 0.4.0 entry points when they exist.
    rate_limit: Option<usize>,
    rate_period: Option<usize>,
}

impl Columns {
    /// How many leading attributes hold every column `reading` reads, up to
    /// `credits`: the refill columns are read only for a key that has
    /// credits ([`Columns::with_refill`]).
    fn needed(&self, reading: Reading) -> usize {
        let mut last = self
            .id
            .max(self.user_id)
            .max(self.last_used_at)
            .max(self.revoked_at)
            .max(self.expires_at.unwrap_or(0))
            .max(self.credits.unwrap_or(0));
        if reading.labels {
            last = last
                .max(self.key_prefix)
                .max(self.name)
                .max(self.metadata.unwrap_or(0));
        }
        if reading.labels || reading.scopes {
            last = last.max(self.scopes.unwrap_or(0));
        }
        if reading.rates {
            last = last
                .max(self.rate_limit.unwrap_or(0))
                .max(self.rate_period.unwrap_or(0));
        }
        last + 1
    }

    /// `needed` and the refill columns, for a key whose `credits` is set.
    fn with_refill(&self, needed: usize) -> usize {
        needed
            .max(self.refill_amount.map_or(0, |i| i + 1))
            .max(self.refill_every.map_or(0, |i| i + 1))
            .max(self.refilled_at.map_or(0, |i| i + 1))
    }

    /// Whether the row in `slot`, deformed up to `credits`, has credits.
    ///
    /// # Safety
    /// `slot` holds a row of the table these columns describe, deformed at
    /// least up to `credits`.
    unsafe fn has_credits(&self, slot: *mut pg_sys::TupleTableSlot) -> bool {
        // SAFETY: the caller's contract.
        self.credits
            .is_some_and(|i| unsafe { !*(*slot).tts_isnull.add(i) })
    }
}

/// What a column of `api_keys` is, by name.
enum Found {
    Missing,
    Typed(usize),
    WrongType,
}

unsafe fn columns(tupdesc: pg_sys::TupleDesc) -> Option<Columns> {
    // SAFETY: tupdesc is the open relation's descriptor, valid while it stays open.
    unsafe {
        // PgTupleDesc reads the attributes the way each major lays them out.
        let desc = pgrx::PgTupleDesc::from_pg_unchecked(tupdesc);
        let attrs: Vec<&pg_sys::FormData_pg_attribute> = desc.iter().collect();
        let find = |wanted: &str, type_oid: pg_sys::Oid| {
            let position = attrs.iter().position(|a| {
                !a.attisdropped
                    && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == wanted.as_bytes()
            });
            match position {
                None => Found::Missing,
                Some(i) if attrs[i].atttypid == type_oid => Found::Typed(i),
                Some(_) => Found::WrongType,
            }
        };
        let required = |wanted: &str, type_oid: pg_sys::Oid| match find(wanted, type_oid) {
            Found::Typed(i) => Some(i),
            _ => None,
        };
        // A 0.2.0 column may be missing (a database still at 0.1.0), but one of
        // another type must not read as "never expires" or "unrestricted": the
        // probe refuses the table, and the SQL fallback fails the call.
        let optional = |wanted: &str, type_oid: pg_sys::Oid| match find(wanted, type_oid) {
            Found::Missing => Some(None),
            Found::Typed(i) => Some(Some(i)),
            Found::WrongType => None,
        };
        Some(Columns {
            id: required("id", pg_sys::UUIDOID)?,
            user_id: required("user_id", pg_sys::UUIDOID)?,
            key_hash: required("key_hash", pg_sys::VARCHAROID)?,
            key_prefix: required("key_prefix", pg_sys::VARCHAROID)?,
            name: required("name", pg_sys::VARCHAROID)?,
            last_used_at: required("last_used_at", pg_sys::TIMESTAMPTZOID)?,
            revoked_at: required("revoked_at", pg_sys::TIMESTAMPTZOID)?,
            expires_at: optional("expires_at", pg_sys::TIMESTAMPTZOID)?,
            scopes: optional("scopes", pg_sys::TEXTARRAYOID)?,
            metadata: optional("metadata", pg_sys::JSONBOID)?,
            credits: optional("credits", pg_sys::INT4OID)?,
            refill_amount: optional("refill_amount", pg_sys::INT4OID)?,
            refill_every: optional("refill_every", pg_sys::INTERVALOID)?,
            refilled_at: optional("refilled_at", pg_sys::TIMESTAMPTZOID)?,
            rate_limit: optional("rate_limit", pg_sys::INT4OID)?,
            rate_period: optional("rate_period", pg_sys::INTERVALOID)?,
        })
    }
}

/// The table and index a backend probes, found by name once and then kept
/// until a relcache invalidation names either of them (or all relations):
/// DROP, ALTER TABLE, REINDEX, a new index state, ... A `Cell` of a `Copy`
/// value, because the callback can run in the middle of our own code (while
/// a lock is taken) and must never find it borrowed.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Target {
    namespace: pg_sys::Oid,
    heap: pg_sys::Oid,
    index: pg_sys::Oid,
    cols: Columns,
}

thread_local! {
    static TARGET: Cell<Option<Target>> = const { Cell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_target(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    TARGET.with(|target| {
        if let Some(t) = target.get() {
            if relid == pg_sys::InvalidOid || relid == t.heap || relid == t.index {
                target.set(None);
            }
        }
    });
}

/// Whether this backend holds `AccessShareLock` on relation `relid` of this
/// database, in any of its resource owners: the lock manager's own record,
/// not a guess from transaction or subtransaction ids (a failed cursor's
/// locks go when a savepoint rolls back, while the subtransaction id the
/// caller sees comes back to what it was).
unsafe fn share_lock_held(relid: pg_sys::Oid) -> bool {
    // SAFETY: only reads this backend's lock table.
    unsafe {
        let tag = pg_sys::LOCKTAG {
            locktag_field1: pg_sys::MyDatabaseId.to_u32(),
            locktag_field2: relid.to_u32(),
            locktag_field3: 0,
            locktag_field4: 0,
            locktag_type: pg_sys::LockTagType::LOCKTAG_RELATION as u8,
            locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
        };
        let mode = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        // 17 added "or a stronger mode": exactly this mode, as before.
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        return pg_sys::LockHeldByMe(&tag, mode);
        #[cfg(not(any(feature = "pg15", feature = "pg16")))]
        return pg_sys::LockHeldByMe(&tag, mode, false);
    }
}

/// Looks `hash` up in `api_keys` of `namespace`.
///
/// `None`: the index cannot be used as expected (missing, invalid, or not the
/// plain unique index on `key_hash` the install created); the caller then
/// takes the SPI path. `Some(None)`: no such key.
pub(super) fn find_by_hash(
    namespace: pg_sys::Oid,
    hash: &str,
    reading: Reading,
) -> Option<Option<FoundKey>> {
    // SAFETY: relations are opened under AccessShareLock (or one this
    // transaction already holds) and checked against the kept target
    // before `probe` uses them.
    unsafe {
        if !CALLBACK_REGISTERED.get() {
            pg_sys::CacheRegisterRelcacheCallback(Some(forget_target), pg_sys::Datum::from(0));
            CALLBACK_REGISTERED.set(true);
        }
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        // Twice at most: a kept target may turn out stale once its locks are
        // taken (taking a lock processes pending invalidations).
        for _ in 0..2 {
            let target = match TARGET.get() {
                Some(t) if t.namespace == namespace => t,
                _ => {
                    let found = look_up(namespace)?;
                    TARGET.set(Some(found));
                    found
                }
            };
            // Locks this transaction already holds stay until it ends or the
            // owner that took them goes; while held, nobody can drop or
            // rewrite either relation, so they are opened without the lock
            // manager, as the executor does for every row after its first.
            if share_lock_held(target.heap) && share_lock_held(target.index) {
                return Some(probe(&target, None, hash, reading));
            }
            let heap = pg_sys::try_table_open(target.heap, lock);
            if heap.is_null() {
                TARGET.set(None);
                continue;
            }
            let index = pg_sys::try_index_open(target.index, lock);
            if index.is_null() || TARGET.get() != Some(target) {
                if !index.is_null() {
                    pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
                }
                pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
                TARGET.set(None);
                continue;
            }
            return Some(probe(&target, Some((heap, index)), hash, reading));
        }
        None
    }
}

/// Finds `api_keys` and our index in `namespace` by name and checks them;
/// `None` if either is missing or not as the install made it.
unsafe fn look_up(namespace: pg_sys::Oid) -> Option<Target> {
    // SAFETY: relations are opened with a lock and closed before returning (the lock stays until the transaction ends, as the executor keeps it).
    unsafe {
        let heap_oid = pg_sys::get_relname_relid(TABLE.as_ptr(), namespace);
        let index_oid = pg_sys::get_relname_relid(HASH_INDEX.as_ptr(), namespace);
        if heap_oid == pg_sys::InvalidOid || index_oid == pg_sys::InvalidOid {
            return None;
        }
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let heap = pg_sys::try_table_open(heap_oid, lock);
        if heap.is_null() {
            return None;
        }
        let index = pg_sys::try_index_open(index_oid, lock);
        let cols = if index.is_null() {
            None
        } else {
            let cols = usable_columns(heap, heap_oid, index);
            pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
            cols
        };
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        Some(Target {
            namespace,
            heap: heap_oid,
            index: index_oid,
            cols: cols?,
        })
    }
}

/// The columns, if `index` is the valid, non-partial, one-column unique
/// btree on `api_keys.key_hash`.
unsafe fn usable_columns(
    heap: pg_sys::Relation,
    heap_oid: pg_sys::Oid,
    index: pg_sys::Relation,
) -> Option<Columns> {
    // SAFETY: heap and index are open relations, valid for this call.
    unsafe {
        let form = (*index).rd_index;
        let cols = columns((*heap).rd_att)?;
        let keys = (*form).indkey.values.as_slice(1);
        let ok = (*form).indrelid == heap_oid
            && (*form).indisvalid
            && (*form).indisready
            && (*form).indisunique
            && (*form).indnatts == 1
            && (*(*index).rd_rel).relam == pg_sys::BTREE_AM_OID
            && keys[0] as usize == cols.key_hash + 1
            && pg_sys::RelationGetIndexPredicate(index).is_null()
            && pg_sys::RelationGetIndexExpressions(index).is_null();
        ok.then_some(cols)
    }
}

/// An open probe: the relations, the scan and the slot holding the row found.
#[derive(Clone, Copy)]
struct Scan {
    /// How many attributes of the row found were deformed.
    natts: i32,
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    scan: pg_sys::IndexScanDesc,
    slot: *mut pg_sys::TupleTableSlot,
    snapshot: ReadSnapshot,
    found: bool,
}

/// Probes the index of `target`, whose locks this transaction holds, with
/// its table and index as just opened, or (`None`) opening them here.
unsafe fn probe(
    target: &Target,
    opened: Option<(pg_sys::Relation, pg_sys::Relation)>,
    hash: &str,
    reading: Reading,
) -> Option<FoundKey> {
    use unguarded::*;
    // Deform only as far as the last column this reading uses.
    let natts = target.cols.needed(reading) as i32;
    let no_lock = pg_sys::NoLock as pg_sys::LOCKMODE;
    // SAFETY: one guard around the calls that open the scan: only raw
    // pointers and plain values live in it (see `unguarded`); the relations
    // are locked by this transaction (the caller's contract).
    let open = unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            let (heap, index) = match opened {
                Some(relations) => relations,
                None => (
                    relation_open(target.heap, no_lock),
                    relation_open(target.index, no_lock),
                ),
            };
            let snapshot = ReadSnapshot::take();
            let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
            let hash_text = cstring_to_text_with_len(hash.as_ptr().cast(), hash.len() as i32);
            ScanKeyEntryInitialize(
                &mut key,
                0,
                1,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                *(*index).rd_indcollation,
                pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                pg_sys::Datum::from(hash_text),
            );
            #[cfg(not(feature = "pg18"))]
            let scan = index_beginscan(heap, index, snapshot.get(), 1, 0);
            #[cfg(feature = "pg18")]
            let scan = index_beginscan(heap, index, snapshot.get(), std::ptr::null_mut(), 1, 0);
            index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
            let slot = table_slot_create(heap, std::ptr::null_mut());
            let found = index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot);
            if found && (*slot).tts_nvalid < natts as pg_sys::AttrNumber {
                slot_getsomeattrs_int(slot, natts);
            }
            let natts = if found && target.cols.has_credits(slot) {
                let all = target.cols.with_refill(natts as usize) as i32;
                if (*slot).tts_nvalid < all as pg_sys::AttrNumber {
                    slot_getsomeattrs_int(slot, all);
                }
                all
            } else {
                natts
            };
            Scan {
                natts,
                heap,
                index,
                scan,
                slot,
                snapshot,
                found,
            }
        })
    };
    // Values are read (and copied where by reference) while the tuple is
    // pinned and the snapshot is active.
    // SAFETY: the slot holds the row found, deformed up to `open.natts`.
    let found = open.found.then(|| unsafe {
        let natts = open.natts as usize;
        let values = std::slice::from_raw_parts((*open.slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts((*open.slot).tts_isnull, natts);
        read_row(values, nulls, &target.cols, reading)
    });
    // SAFETY: closes what the first step opened, in reverse order, under
    // one guard with only raw pointers on the stack.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            ExecDropSingleTupleTableSlot(open.slot);
            index_endscan(open.scan);
            open.snapshot.release();
            // Like the executor, keep the locks until the end of the transaction.
            relation_close(open.index, no_lock);
            relation_close(open.heap, no_lock);
        });
    }
    found
}

unsafe fn read_row(
    values: &[pg_sys::Datum],
    nulls: &[bool],
    cols: &Columns,
    reading: Reading,
) -> FoundKey {
    // SAFETY: values and nulls are the slot's, valid while the tuple stays
    // pinned, which the caller guarantees.
    unsafe {
        let uuid = |i: usize| {
            pgrx::Uuid::from_datum(values[i], nulls[i]).expect("uuid column is not null")
        };
        let timestamp = |i: usize| (!nulls[i]).then(|| values[i].value() as i64);
        let text = |i: usize| {
            if reading.labels {
                String::from_datum(values[i], nulls[i])
            } else {
                None
            }
        };
        let scopes = cols.scopes.filter(|_| reading.scopes).and_then(|i| {
            Vec::<Option<String>>::from_datum(values[i], nulls[i])
                .map(|held| held.into_iter().flatten().collect())
        });
        let metadata = cols
            .metadata
            .filter(|_| reading.labels)
            .and_then(|i| StoredJsonb::from_datum(values[i], nulls[i]));
        let int = |i: Option<usize>| i.and_then(|i| i32::from_datum(values[i], nulls[i]));
        // Most keys have no credits: their refill columns are not read.
        let credits = int(cols.credits).and_then(|credits| {
            credits_of(
                Some(credits),
                int(cols.refill_amount),
                cols.refill_every
                    .and_then(|i| Interval::from_datum(values[i], nulls[i])),
                cols.refilled_at.and_then(timestamp),
            )
        });
        FoundKey {
            id: uuid(cols.id),
            user_id: uuid(cols.user_id),
            key_prefix: text(cols.key_prefix),
            name: text(cols.name),
            last_used_at: timestamp(cols.last_used_at),
            revoked_at: timestamp(cols.revoked_at),
            expires_at: cols.expires_at.and_then(timestamp),
            scopes,
            metadata,
            credits,
            rate_limit: if reading.rates {
                rate_limit_of(
                    int(cols.rate_limit),
                    cols.rate_period
                        .and_then(|i| Interval::from_datum(values[i], nulls[i])),
                )
            } else {
                None
            },
        }
    }
}
