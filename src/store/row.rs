//! The rows the store reads and writes, as Rust values.

use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;

use crate::clock;
use crate::jsonb::StoredJsonb;
use crate::policy::{Credits, Lifetime, Micros};
use crate::rate::RateLimit;

/// What a lookup should read beyond the columns every verification needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    /// `key_prefix`, `name` and `metadata`, which only mk_verify_detail shows.
    pub(crate) labels: bool,
    /// `scopes`, for the forms that take required scopes.
    pub(crate) scopes: bool,
    /// 0.4.0: `rate_limit` and `rate_period`, which only the 0.4.0 entry
    /// points read (before the update such columns are the application's).
    pub(crate) rates: bool,
}

/// A row found by hash. Timestamps are PostgreSQL's microseconds.
pub(crate) struct FoundKey {
    pub(crate) id: pgrx::Uuid,
    pub(crate) user_id: pgrx::Uuid,
    pub(crate) key_prefix: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) last_used_at: Option<Micros>,
    pub(crate) revoked_at: Option<Micros>,
    pub(crate) expires_at: Option<Micros>,
    /// Read only when asked for; `None` also means "unrestricted".
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) metadata: Option<StoredJsonb>,
    /// `None`: the key has no credits (unlimited), or the 0.3.0 columns do
    /// not exist yet.
    pub(crate) credits: Option<Credits>,
    /// 0.4.0: `None` for a key without a rate limit, or when not read.
    pub(crate) rate_limit: Option<RateLimit>,
}

/// A key's rate limit from its two columns: both set, or none. A row
/// changed by hand so that only one is set, or with a limit no issuing
/// function accepts, must not read as "unlimited": it gets a limit that
/// passes nothing (`rate::Bucket::charge` refuses it).
pub(super) fn rate_limit_of(
    per_period: Option<i32>,
    period: Option<Interval>,
) -> Option<RateLimit> {
    match (per_period, period) {
        (None, None) => None,
        (Some(per_period), Some(period)) => Some(RateLimit {
            per_period,
            period: clock::fixed_length(period),
        }),
        _ => Some(RateLimit {
            per_period: 0,
            period: 0,
        }),
    }
}

/// The credits of a row from its four columns: a key has credits when
/// `credits` is set, and refills when the three refill columns are.
pub(super) fn credits_of(
    credits: Option<i32>,
    refill_amount: Option<i32>,
    refill_every: Option<Interval>,
    refilled_at: Option<Micros>,
) -> Option<Credits> {
    let remaining = credits?;
    let refill = match (refill_amount, refill_every, refilled_at) {
        (Some(amount), Some(every), Some(at)) => Some((amount, clock::period(every), at)),
        _ => None,
    };
    Some(Credits { remaining, refill })
}

pub(crate) struct IssuedRow {
    pub(crate) id: pgrx::Uuid,
    pub(crate) created_at: TimestampWithTimeZone,
}

/// What a new key carries besides its hash and prefix (0.2.0 options).
pub(crate) struct NewKey<'a> {
    pub(crate) name: Option<&'a str>,
    pub(crate) expires_at: Option<TimestampWithTimeZone>,
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) metadata: Option<StoredJsonb>,
    /// 0.3.0: the starting credits, the refill (amount, period), and when
    /// its schedule started (`None`: now).
    pub(crate) credits: Option<i32>,
    pub(crate) refill: Option<(i32, Interval)>,
    pub(crate) refilled_at: Option<TimestampWithTimeZone>,
    /// 0.4.0: the rate limit (per period, period).
    pub(crate) rate_limit: Option<(i32, Interval)>,
}

impl NewKey<'_> {
    pub(super) fn has_options(&self) -> bool {
        self.expires_at.is_some()
            || self.scopes.is_some()
            || self.metadata.is_some()
            || self.credits.is_some()
    }
}

/// The user's active key, as a rotation inherits from it.
pub(crate) struct ActiveKey {
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) metadata: Option<StoredJsonb>,
    /// When it was issued and when it expires, if it does.
    pub(crate) lifetime: Option<Lifetime>,
    /// Its remaining credits and refill, which move to the new key.
    pub(crate) credits: Option<i32>,
    pub(crate) refill: Option<(i32, Interval)>,
    /// When it was last refilled: the new key refills on the same schedule.
    pub(crate) refilled_at: Option<TimestampWithTimeZone>,
    /// 0.4.0: its rate limit, which the new key keeps.
    pub(crate) rate_limit: Option<(i32, Interval)>,
}

/// What a rotation inherits from a key row read as `scopes, metadata,
/// expires_at, created_at` and (`with_credits`, 0.3.0) `credits,
/// refill_amount, refill_every, refilled_at` and (`with_rates`, 0.4.0, only
/// with credits) `rate_limit, rate_period`, starting at column `first`.
pub(super) fn inherited_from(
    row: &SpiHeapTupleData<'_>,
    first: usize,
    with_credits: bool,
    with_rates: bool,
) -> ActiveKey {
    let rate = |offset: usize| (with_credits && with_rates).then_some(first + 8 + offset);
    let rate_limit = rate(0).and_then(|i| row.get::<i32>(i).expect("rate_limit"));
    let rate_period = rate(1).and_then(|i| row.get::<Interval>(i).expect("rate_period"));
    let scopes: Option<Vec<Option<String>>> = row.get(first).expect("scopes");
    let expires_at: Option<TimestampWithTimeZone> = row.get(first + 2).expect("expires_at");
    let created_at: Option<TimestampWithTimeZone> = row.get(first + 3).expect("created_at");
    let credit = |offset: usize| with_credits.then_some(first + 4 + offset);
    let refill_amount = credit(1).and_then(|i| row.get::<i32>(i).expect("refill_amount"));
    let refill_every = credit(2).and_then(|i| row.get::<Interval>(i).expect("refill_every"));
    ActiveKey {
        scopes: scopes.map(|s| s.into_iter().flatten().collect()),
        metadata: row.get(first + 1).expect("metadata"),
        lifetime: expires_at.zip(created_at).map(|(e, c)| Lifetime {
            created_at: c.into(),
            expires_at: e.into(),
        }),
        credits: credit(0).and_then(|i| row.get(i).expect("credits")),
        refill: refill_amount.zip(refill_every),
        refilled_at: credit(3).and_then(|i| row.get(i).expect("refilled_at")),
        // Half a limit (a row changed by hand) is carried as a limit that
        // passes nothing, never dropped: a rotation must not unlimit a key.
        rate_limit: match (rate_limit, rate_period) {
            (None, None) => None,
            (limit, period) => Some((
                limit.unwrap_or(0),
                period.unwrap_or_else(|| Interval::from_micros(0)),
            )),
        },
    }
}

/// The row an `INSERT ... RETURNING id, created_at` made.
pub(super) fn issued_row(table: pgrx::spi::SpiTupleTable<'_>) -> IssuedRow {
    let row = table.first();
    IssuedRow {
        id: row.get(1).expect("id").expect("id is not null"),
        created_at: row
            .get(2)
            .expect("created_at")
            .expect("created_at is not null"),
    }
}

/// A lookup row read by column name; 0.2.0 columns may be absent.
pub(super) fn found_from_row(row: &SpiHeapTupleData<'_>, reading: Reading) -> FoundKey {
    // A missing column is one this database does not have yet (0.1.0); any
    // other problem, such as a column whose type was changed, must not read
    // as "no expiry" or "unrestricted": it fails the call.
    fn optional<T: IntoDatum + FromDatum>(row: &SpiHeapTupleData<'_>, column: &str) -> Option<T> {
        match row.get_by_name::<T, _>(column) {
            Ok(value) => value,
            Err(pgrx::spi::SpiError::SpiError(pgrx::spi::SpiErrorCodes::NoAttribute)) => None,
            Err(e) => panic!("api_keys.{column} is not what makima_keys expects: {e}"),
        }
    }
    let micros = |column: &str| {
        optional::<TimestampWithTimeZone>(row, column).map(pg_sys::TimestampTz::from)
    };
    FoundKey {
        id: optional(row, "id").expect("id is not null"),
        user_id: optional(row, "user_id").expect("user_id is not null"),
        key_prefix: optional(row, "key_prefix").filter(|_| reading.labels),
        name: optional(row, "name").filter(|_| reading.labels),
        last_used_at: micros("last_used_at"),
        revoked_at: micros("revoked_at"),
        expires_at: micros("expires_at"),
        scopes: optional::<Vec<Option<String>>>(row, "scopes")
            .filter(|_| reading.scopes)
            .map(|s| s.into_iter().flatten().collect()),
        metadata: optional(row, "metadata").filter(|_| reading.labels),
        credits: credits_of(
            optional(row, "credits"),
            optional(row, "refill_amount"),
            optional(row, "refill_every"),
            micros("refilled_at"),
        ),
        rate_limit: if reading.rates {
            rate_limit_of(optional(row, "rate_limit"), optional(row, "rate_period"))
        } else {
            None
        },
    }
}
