//! Verification: `mk_verify` and `mk_verify_detail`, and the one algorithm
//! behind both (`verify_key`).
//!
//! `mk_verify` is SECURITY INVOKER on purpose (see `store::owner`): the
//! probe resolves no names, and the statements it may run get the owner's
//! rights and a pinned search_path there. The `mk_verify_detail`
//! definition is in `sql/src/functions.sql`: it returns its one row in
//! materialize mode (see `one_row`).

use pgrx::prelude::*;

use super::args::{checked_cost, with_requirement};
use super::call::store_for;
use crate::clock;
use crate::hashing::KeyHash;
use crate::jsonb::StoredJsonb;
use crate::key_format::{self, KeyShape};
use crate::one_row::OneRow;
use crate::policy::{self, KeyStatus, Micros, Requirement};
use crate::rate::{RateLimit, Receipt};
use crate::settings;
use crate::shared::{self, Take};
use crate::store::{self, DueRefill, FoundKey, Reading, Spent};

/// What a verification found; `Malformed` and `NotFound` carry no row.
// Returned once per call by value: boxing the row would add an allocation
// to the hot path.
#[allow(clippy::large_enum_variant)]
pub(super) enum Verdict {
    Malformed,
    NotFound,
    Found(FoundKey, KeyStatus, Usage),
}

/// What a key with credits holds after the call, and when a refused call
/// could pass (for `usage_exceeded`: the next refill).
#[derive(Default, Clone, Copy)]
pub(super) struct Usage {
    pub(super) credits: Option<i32>,
    pub(super) retry_after: Option<Micros>,
}

/// How many times a spend is tried again after the row changed under it
/// (another transaction spent, refilled or revoked it first).
const SPEND_ATTEMPTS: usize = 3;

/// Which contract an entry point keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Contract {
    /// 0.2.x: never spends (such columns can only be the application's).
    V0_2,
    /// 0.3.0: spends credits; knows no rate limits or shared memory.
    V0_3,
    /// 0.4.0: rate limits, and when preloaded, statistics and no writes.
    V0_4,
}

/// Checks the key's shape, finds its row by hash, and judges it at the wall
/// clock; the 0.4.0 entry points then count the call in shared memory (when
/// preloaded). See [`judge`].
pub(super) fn verify_key(
    fcinfo: pg_sys::FunctionCallInfo,
    key: Option<&str>,
    requirement: Requirement<'_>,
    with_labels: bool,
    cost: i32,
    contract: Contract,
) -> Verdict {
    let verdict = judge(fcinfo, key, requirement, with_labels, cost, contract);
    if contract == Contract::V0_4 {
        match &verdict {
            Verdict::Malformed => shared::record_unknown(true),
            Verdict::NotFound => shared::record_unknown(false),
            Verdict::Found(..) => {}
        }
    }
    verdict
}

/// A valid key with credits spends `cost` of them in the caller's
/// transaction (not the 0.2.x entry points, which never spend); a key with
/// a rate limit (0.4.0) first draws `cost` tokens from its user's bucket in
/// shared memory. A valid key without credits gets `last_used_at`: when
/// preloaded (0.4.0), recorded in shared memory for the worker to write;
/// otherwise written when it is due and this call may write
/// (`store::may_write_last_used`).
fn judge(
    fcinfo: pg_sys::FunctionCallInfo,
    key: Option<&str>,
    requirement: Requirement<'_>,
    with_labels: bool,
    cost: i32,
    contract: Contract,
) -> Verdict {
    let Some(key) = key else {
        return Verdict::Malformed;
    };
    if key_format::shape(key) == KeyShape::Malformed {
        return Verdict::Malformed;
    }
    let store = store_for(fcinfo);
    let counting = contract == Contract::V0_4 && shared::serves_this_database();
    let reading = Reading {
        labels: with_labels,
        scopes: with_labels || requirement != Requirement::None,
        rates: contract == Contract::V0_4,
    };
    let hash = KeyHash::of(key);
    for _ in 0..SPEND_ATTEMPTS {
        let Some(found) = store.find_by_hash(hash.as_str(), reading) else {
            return Verdict::NotFound;
        };
        // The wall clock, not the transaction start: a revocation or expiry
        // that is visible must take effect, however long this transaction
        // has run. Read only for keys that can end, refill or be limited,
        // and for the statistics.
        let now = if counting
            || found.revoked_at.is_some()
            || found.expires_at.is_some()
            || found.credits.is_some()
            || found.rate_limit.is_some()
        {
            clock::wall_clock()
        } else {
            0
        };
        let scopes_ok = policy::satisfies(found.scopes.as_deref(), requirement);
        let status = policy::status(found.revoked_at, found.expires_at, now, scopes_ok);
        let credits = found.credits.filter(|_| contract != Contract::V0_2);
        let mut usage = Usage::default();
        let Some(credits) = credits else {
            let status = match (status, found.rate_limit) {
                (KeyStatus::Valid, Some(limit)) => {
                    rate_verdict(draw(found.user_id, limit, cost, now), &mut usage).0
                }
                _ => status,
            };
            if status == KeyStatus::Valid {
                // Owed only when due, by the rule without shared memory: a
                // key written within the interval owes the worker nothing,
                // so a round has at most one row to write per key and
                // interval, and none to look at for a key that is not due.
                let due = policy::last_used_due(
                    found.last_used_at,
                    clock::transaction_start(),
                    settings::last_used_interval_secs(),
                );
                let owe = counting && due && !store::in_recovery();
                let recorded = counting && shared::record(found.id, status, now, owe);
                if due && !(owe && recorded) {
                    touch_when_due(&store, &found);
                }
            } else if counting {
                shared::record(found.id, status, now, false);
            }
            return Verdict::Found(found, status, usage);
        };
        let (available, refilled_at) = policy::available(credits, now);
        usage.credits = Some(available);
        let judged = |verdict: Verdict| {
            if let (true, Verdict::Found(found, status, _)) = (counting, &verdict) {
                shared::record(found.id, *status, now, false);
            }
            verdict
        };
        if status != KeyStatus::Valid {
            return judged(Verdict::Found(found, status, usage));
        }
        if cost == 0 || available < cost {
            // A rate limit that would refuse the call comes first.
            if let Some(limit) = found.rate_limit {
                let (limited, _) =
                    rate_verdict(shared::peek(found.user_id, limit, cost, now), &mut usage);
                if limited != KeyStatus::Valid {
                    return judged(Verdict::Found(found, limited, usage));
                }
            }
            if cost == 0 {
                return judged(Verdict::Found(found, status, usage));
            }
            usage.retry_after = policy::next_refill(credits, refilled_at).map(|at| at - now);
            return judged(Verdict::Found(found, KeyStatus::UsageExceeded, usage));
        }
        let mut receipt = None;
        if let Some(limit) = found.rate_limit {
            let (limited, drawn) =
                rate_verdict(shared::take(found.user_id, limit, cost, now), &mut usage);
            if limited != KeyStatus::Valid {
                return judged(Verdict::Found(found, limited, usage));
            }
            receipt = drawn;
        }
        // What this call drew, given back if it does not pass after all (a
        // refusal; an ERROR in the spend keeps it, as a rollback does).
        let refund = |found: &FoundKey| {
            if let Some(receipt) = receipt {
                shared::refund(found.user_id, receipt, clock::wall_clock());
            }
        };
        if !store::may_spend_credits() {
            refund(&found);
            return judged(Verdict::Found(found, KeyStatus::UsageUnavailable, usage));
        }
        let refill = refilled_at
            .zip(credits.refill)
            .map(|(to, (_, _, from))| DueRefill { from, to });
        match store.spend_credits(found.id, cost, refill) {
            Spent::Left(left) => {
                if left == 0 {
                    store.announce_used_up(found.id);
                }
                usage.credits = Some(left);
                return judged(Verdict::Found(found, KeyStatus::Valid, usage));
            }
            Spent::Unavailable => {
                refund(&found);
                return judged(Verdict::Found(found, KeyStatus::UsageUnavailable, usage));
            }
            // Read the row again, as it is now, and judge it again.
            Spent::Changed => refund(&found),
        }
    }
    // The row kept changing under us: fail closed.
    match store.find_by_hash(hash.as_str(), reading) {
        Some(found) => Verdict::Found(found, KeyStatus::UsageUnavailable, Usage::default()),
        None => Verdict::NotFound,
    }
}

/// Draws `cost` from the user's budget; a call of cost 0 only looks (it
/// passes wherever a budget can be kept, and takes no room in the hash).
fn draw(user: pgrx::Uuid, limit: RateLimit, cost: i32, now: policy::Micros) -> Take {
    if cost == 0 {
        shared::peek(user, limit, cost, now)
    } else {
        shared::take(user, limit, cost, now)
    }
}

/// The status a draw from a rate-limit budget gives (`Valid`: it passed,
/// with the receipt of what it drew), with `retry_after` set when a later
/// call of that cost would pass.
fn rate_verdict(take: Take, usage: &mut Usage) -> (KeyStatus, Option<Receipt>) {
    match take {
        Take::Passed(receipt) => (KeyStatus::Valid, Some(receipt)),
        Take::Limited { retry_after } => {
            usage.retry_after = Some(retry_after);
            (KeyStatus::RateLimited, None)
        }
        Take::Never => (KeyStatus::RateLimited, None),
        Take::Unavailable => (KeyStatus::RateLimitUnavailable, None),
    }
}

/// Writes `last_used_at` of a valid key when it is due and this call may
/// write: the rule without shared memory.
fn touch_when_due(store: &store::Store, found: &FoundKey) {
    if policy::last_used_due(
        found.last_used_at,
        clock::transaction_start(),
        settings::last_used_interval_secs(),
    ) && store::may_write_last_used()
    {
        store.touch_last_used(found.id);
    }
}

pub(super) fn verified_user(verdict: Verdict) -> Option<pgrx::Uuid> {
    match verdict {
        Verdict::Found(found, KeyStatus::Valid, _) => Some(found.user_id),
        _ => None,
    }
}

/// The required scopes of the 0.3.0 forms: `'{}'`, the default, requires
/// nothing and reads no scopes; NULL fails closed.
fn with_required<R>(
    required_scopes: Option<Array<'_, &str>>,
    f: impl FnOnce(Requirement<'_>) -> R,
) -> R {
    match required_scopes {
        Some(array) if array.is_empty() => f(Requirement::None),
        other => with_requirement(other, f),
    }
}

/// Whether the `text[]` argument `num` is an array with no elements (the
/// default `'{}'`), read from its header: the hot path then builds no
/// array of the arguments at all.
///
/// # Safety
/// `fcinfo` is the call's own, and argument `num` is a non-NULL `text[]`.
unsafe fn is_empty_array(fcinfo: pg_sys::FunctionCallInfo, num: usize) -> bool {
    // SAFETY: the caller's contract; a detoasted array begins with its header.
    unsafe {
        let datum = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, num);
        let array = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
        (*array).ndim == 0
    }
}

/// The user id of a live key that holds every scope in `required_scopes`
/// and, if it has credits, could spend `cost` of them; NULL for anything
/// else. Never raises for any text; a NULL or negative cost is an error.
///
/// `mk_verify(key text, required_scopes text[] DEFAULT '{}', cost integer
/// DEFAULT 1)`, defined in `sql/src/functions.sql`: the arguments are read
/// from `fcinfo` here, so that the usual call, with the default scopes,
/// costs no more than the one-argument form of 0.2.
#[pg_extern(sql = false)]
fn mk_verify_v3(fcinfo: pg_sys::FunctionCallInfo) -> Option<pgrx::Uuid> {
    // SAFETY: our own fcinfo, with the three arguments the 0.3.0 script declares.
    unsafe { verify_from_fcinfo(fcinfo, Contract::V0_3) }
}

/// `mk_verify` of 0.4.0: the same arguments, and rate limits, statistics
/// and (when preloaded) no writes.
#[pg_extern(sql = false)]
fn mk_verify_v4(fcinfo: pg_sys::FunctionCallInfo) -> Option<pgrx::Uuid> {
    // SAFETY: our own fcinfo, with the three arguments functions.sql declares.
    unsafe { verify_from_fcinfo(fcinfo, Contract::V0_4) }
}

/// # Safety
/// `fcinfo` is the call's own, with the arguments `(text, text[], integer)`.
unsafe fn verify_from_fcinfo(
    fcinfo: pg_sys::FunctionCallInfo,
    contract: Contract,
) -> Option<pgrx::Uuid> {
    // SAFETY: the caller's contract.
    unsafe {
        let key = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 0);
        let cost = checked_cost(pgrx::fcinfo::pg_getarg::<i32>(fcinfo, 2))
            .unwrap_or_else(|e| e.raise("mk_verify"));
        if !pgrx::fcinfo::pg_arg_is_null(fcinfo, 1) && is_empty_array(fcinfo, 1) {
            return verified_user(verify_key(
                fcinfo,
                key,
                Requirement::None,
                false,
                cost,
                contract,
            ));
        }
        let required_scopes = pgrx::fcinfo::pg_getarg::<Array<&str>>(fcinfo, 1);
        with_requirement(required_scopes, |requirement| {
            verified_user(verify_key(fcinfo, key, requirement, false, cost, contract))
        })
    }
}

/// One row of `mk_verify_detail`, in its column order.
pub(super) struct Detail {
    pub(super) status: &'static str,
    pub(super) key_id: Option<pgrx::Uuid>,
    pub(super) user_id: Option<pgrx::Uuid>,
    pub(super) key_prefix: Option<String>,
    pub(super) name: Option<String>,
    expires_at: Option<TimestampWithTimeZone>,
    revoked_at: Option<TimestampWithTimeZone>,
    scopes: Option<Vec<String>>,
    metadata: Option<StoredJsonb>,
    retry_after: Option<Interval>,
    credits: Option<i32>,
}

pub(super) fn detail_of(verdict: Verdict) -> Detail {
    let timestamp = |t: Option<Micros>| t.and_then(|t| TimestampWithTimeZone::try_from(t).ok());
    let empty = |status: &'static str| Detail {
        status,
        key_id: None,
        user_id: None,
        key_prefix: None,
        name: None,
        expires_at: None,
        revoked_at: None,
        scopes: None,
        metadata: None,
        retry_after: None,
        credits: None,
    };
    match verdict {
        Verdict::Malformed => empty("malformed"),
        Verdict::NotFound => empty("not_found"),
        Verdict::Found(found, status, usage) => Detail {
            status: status.as_str(),
            key_id: Some(found.id),
            user_id: Some(found.user_id),
            key_prefix: found.key_prefix,
            name: found.name,
            expires_at: timestamp(found.expires_at),
            revoked_at: timestamp(found.revoked_at),
            scopes: found.scopes,
            metadata: found.metadata,
            retry_after: usage
                .retry_after
                .map(|micros| Interval::new(0, 0, micros.max(0)).expect("a positive interval")),
            credits: usage.credits,
        },
    }
}

/// The columns of mk_verify_detail: status, key_id, user_id, key_prefix,
/// name, expires_at, revoked_at, scopes, metadata, then (0.3.0)
/// retry_after and credits.
const DETAIL_ROW_TYPES: [pg_sys::Oid; 11] = [
    pg_sys::TEXTOID,
    pg_sys::UUIDOID,
    pg_sys::UUIDOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::JSONBOID,
    pg_sys::INTERVALOID,
    pg_sys::INT4OID,
];

/// The 0.2.0 row: the first nine columns.
pub(super) const DETAIL_ROW_TYPES_0_2_0: [pg_sys::Oid; 9] = {
    let mut types = [pg_sys::InvalidOid; 9];
    let mut i = 0;
    while i < 9 {
        types[i] = DETAIL_ROW_TYPES[i];
        i += 1;
    }
    types
};

impl Detail {
    fn values(self) -> [Option<pg_sys::Datum>; 11] {
        [
            self.status.into_datum(),
            self.key_id.into_datum(),
            self.user_id.into_datum(),
            self.key_prefix.into_datum(),
            self.name.into_datum(),
            self.expires_at.into_datum(),
            self.revoked_at.into_datum(),
            self.scopes.into_datum(),
            self.metadata.into_datum(),
            self.retry_after.into_datum(),
            self.credits.into_datum(),
        ]
    }

    fn put(self, row: OneRow<11>) {
        // SAFETY: the values are of DETAIL_ROW_TYPES, which `row` was begun with.
        unsafe { row.put(self.values()) }
    }

    /// The 0.2.0 row, without retry_after and credits.
    pub(super) fn put_0_2_0(self, row: OneRow<9>) {
        let values = self.values();
        let mut first = [None; 9];
        first.copy_from_slice(&values[..9]);
        // SAFETY: the values are of DETAIL_ROW_TYPES_0_2_0, which `row` was begun with.
        unsafe { row.put(first) }
    }
}

/// Always one row: why a key does or does not verify, what it holds, and
/// (for a key with credits) what is left. Spends exactly as `mk_verify`
/// does with the same arguments.
#[pg_extern(sql = false)]
fn mk_verify_detail_v3(
    key: Option<&str>,
    required_scopes: Option<Array<&str>>,
    cost: Option<i32>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    verify_detail(key, required_scopes, cost, fcinfo, Contract::V0_3);
}

/// `mk_verify_detail` of 0.4.0: also `rate_limited` and
/// `rate_limit_unavailable`, and the call is counted in shared memory.
#[pg_extern(sql = false)]
fn mk_verify_detail_v4(
    key: Option<&str>,
    required_scopes: Option<Array<&str>>,
    cost: Option<i32>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    verify_detail(key, required_scopes, cost, fcinfo, Contract::V0_4);
}

fn verify_detail(
    key: Option<&str>,
    required_scopes: Option<Array<&str>>,
    cost: Option<i32>,
    fcinfo: pg_sys::FunctionCallInfo,
    contract: Contract,
) {
    // SAFETY: our own fcinfo; functions.sql declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &DETAIL_ROW_TYPES) };
    let cost = checked_cost(cost).unwrap_or_else(|e| e.raise("mk_verify_detail"));
    let detail = with_required(required_scopes, |requirement| {
        detail_of(verify_key(fcinfo, key, requirement, true, cost, contract))
    });
    detail.put(row);
}
