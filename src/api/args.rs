//! Argument checks, done before anything is written.

use pgrx::prelude::*;

use crate::clock;
use crate::error::{KeyError, KeyResult};
use crate::jsonb::StoredJsonb;
use crate::policy::{self, Requirement, ScopeProblem};
use crate::shared;

/// The seed declares `name VARCHAR(255)`.
const NAME_MAX_CHARS: usize = 255;

pub(super) fn required<T>(value: Option<T>, argument: &'static str) -> KeyResult<T> {
    value.ok_or(KeyError::NullArgument { argument })
}

pub(super) fn check_name(name: Option<&str>) -> KeyResult<()> {
    let length = name.map_or(0, |n| n.chars().count());
    if length > NAME_MAX_CHARS {
        return Err(KeyError::NameTooLong {
            length,
            limit: NAME_MAX_CHARS,
        });
    }
    Ok(())
}

/// `now() + interval`, which must lie after `now()`.
fn expiry(expires_in: Option<Interval>) -> KeyResult<Option<TimestampWithTimeZone>> {
    let Some(expires_in) = expires_in else {
        return Ok(None);
    };
    let now = clock::transaction_start_timestamp();
    // Calendar arithmetic in the session's time zone, as SQL's now() + interval.
    let at = now + expires_in;
    if at <= now {
        return Err(KeyError::NotPositive {
            argument: "expires_in",
        });
    }
    Ok(Some(at))
}

/// A grace period that ends now (or NULL) means none at all.
pub(super) fn grace_period(grace: Option<Interval>) -> KeyResult<Option<Interval>> {
    let Some(grace) = grace else {
        return Ok(None);
    };
    let now = clock::transaction_start_timestamp();
    let end = now + grace;
    if end < now {
        return Err(KeyError::Negative { argument: "grace" });
    }
    Ok((end > now).then_some(grace))
}

fn checked_scopes(scopes: Option<Array<'_, &str>>) -> KeyResult<Option<Vec<String>>> {
    let Some(scopes) = scopes else {
        return Ok(None);
    };
    policy::normalize_scopes(scopes.iter())
        .map(Some)
        .map_err(|problem| match problem {
            ScopeProblem::NullElement => KeyError::NullScope,
            ScopeProblem::Invalid { position } => KeyError::InvalidScope { position },
            ScopeProblem::TooMany { count } => KeyError::TooManyScopes {
                count,
                limit: policy::MAX_SCOPES,
            },
        })
}

fn checked_metadata(metadata: Option<StoredJsonb>) -> KeyResult<Option<StoredJsonb>> {
    let Some(metadata) = metadata else {
        return Ok(None);
    };
    let found = metadata.type_name();
    if found != "object" {
        return Err(KeyError::MetadataNotObject { found });
    }
    let size = metadata.stored_size();
    if size > policy::MAX_METADATA_BYTES {
        return Err(KeyError::MetadataTooLarge {
            size,
            limit: policy::MAX_METADATA_BYTES,
        });
    }
    Ok(Some(metadata))
}

/// The 0.2.0 issue options, checked.
pub(super) struct IssueOptions {
    pub(super) expires_at: Option<TimestampWithTimeZone>,
    pub(super) scopes: Option<Vec<String>>,
    pub(super) metadata: Option<StoredJsonb>,
}

pub(super) fn issue_options(
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<'_, &str>>,
    metadata: Option<StoredJsonb>,
) -> KeyResult<IssueOptions> {
    check_name(name)?;
    Ok(IssueOptions {
        expires_at: expiry(expires_in)?,
        scopes: checked_scopes(scopes)?,
        metadata: checked_metadata(metadata)?,
    })
}

/// The cost of a verification: never NULL or negative, so that a
/// verify-only role can never add credits.
pub(super) fn checked_cost(cost: Option<i32>) -> KeyResult<i32> {
    let cost = required(cost, "cost")?;
    if cost < 0 {
        return Err(KeyError::Negative { argument: "cost" });
    }
    Ok(cost)
}

/// The 0.3.0 credit options: starting credits and an optional refill.
pub(super) struct CreditOptions {
    pub(super) credits: Option<i32>,
    pub(super) refill: Option<(i32, Interval)>,
}

pub(super) fn credit_options(
    credits: Option<i32>,
    refill_amount: Option<i32>,
    refill_every: Option<Interval>,
) -> KeyResult<CreditOptions> {
    let refill = match (refill_amount, refill_every) {
        (None, None) => None,
        (Some(amount), Some(every)) => Some((amount, every)),
        _ => return Err(KeyError::RefillIncomplete),
    };
    if refill.is_some() && credits.is_none() {
        return Err(KeyError::RefillWithoutCredits);
    }
    if credits.is_some_and(|c| c < 0) {
        return Err(KeyError::Negative {
            argument: "credits",
        });
    }
    if let Some((amount, every)) = refill {
        if amount < 1 {
            return Err(KeyError::TooSmall {
                argument: "refill_amount",
                minimum: 1,
            });
        }
        if !clock::period(every).is_valid() {
            return Err(KeyError::NotPositive {
                argument: "refill_every",
            });
        }
    }
    Ok(CreditOptions { credits, refill })
}

/// The 0.4.0 rate-limit options: both or neither, a limit of at least 1
/// per a positive period. A limit needs the shared tier: without it the
/// key could only ever answer `rate_limit_unavailable`, so issuing one
/// fails instead (55000).
pub(super) fn rate_options(
    rate_limit: Option<i32>,
    rate_period: Option<Interval>,
) -> KeyResult<Option<(i32, Interval)>> {
    let (limit, period) = match (rate_limit, rate_period) {
        (None, None) => return Ok(None),
        (Some(limit), Some(period)) => (limit, period),
        _ => return Err(KeyError::RateIncomplete),
    };
    if limit < 1 {
        return Err(KeyError::TooSmall {
            argument: "rate_limit",
            minimum: 1,
        });
    }
    if !clock::period(period).is_valid() {
        return Err(KeyError::NotPositive {
            argument: "rate_period",
        });
    }
    needs_shared_tier(Some((limit, period)))
}

/// A rate limit, given or inherited, is refused where it cannot be kept.
pub(super) fn needs_shared_tier<T>(limit: Option<T>) -> KeyResult<Option<T>> {
    if limit.is_some() && !shared::is_ready() {
        return Err(KeyError::RateLimitsUnavailable);
    }
    Ok(limit)
}

/// Collects a `text[]` of required scopes; NULL stays "unknown".
pub(super) fn with_requirement<R>(
    required_scopes: Option<Array<'_, &str>>,
    f: impl FnOnce(Requirement<'_>) -> R,
) -> R {
    match required_scopes {
        None => f(Requirement::Unknown),
        Some(array) => {
            let wanted: Vec<Option<&str>> = array.iter().collect();
            f(Requirement::All(&wanted))
        }
    }
}
