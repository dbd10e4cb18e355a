//! The rules that need no database: which scopes a key may hold, what a
//! stored key row means at a given instant, what a rotation passes on, and
//! when `last_used_at` is due. Plain Rust, tested with `cargo test`.

/// At most this many scopes on one key.
pub(crate) const MAX_SCOPES: usize = 64;
/// At most this many characters in one scope.
pub(crate) const MAX_SCOPE_CHARS: usize = 64;
/// Metadata is kept small: it lives in the row that every verification reads.
pub(crate) const MAX_METADATA_BYTES: usize = 8192;

/// Why a scopes argument was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScopeProblem {
    NullElement,
    TooMany { count: usize },
    Invalid { position: usize },
}

/// A scope is a non-empty name of printable characters without whitespace.
fn is_valid_scope(scope: &str) -> bool {
    let chars = scope.chars().count();
    (1..=MAX_SCOPE_CHARS).contains(&chars)
        && scope.chars().all(|c| !c.is_whitespace() && !c.is_control())
}

/// The scopes to store: duplicates dropped, first occurrences kept in order.
/// `position` in errors is 1-based, as SQL arrays count.
pub(crate) fn normalize_scopes<'a>(
    scopes: impl IntoIterator<Item = Option<&'a str>>,
) -> Result<Vec<String>, ScopeProblem> {
    let mut kept: Vec<String> = Vec::new();
    for (index, scope) in scopes.into_iter().enumerate() {
        let scope = scope.ok_or(ScopeProblem::NullElement)?;
        if !is_valid_scope(scope) {
            return Err(ScopeProblem::Invalid {
                position: index + 1,
            });
        }
        if !kept.iter().any(|k| k == scope) {
            kept.push(scope.to_owned());
        }
    }
    if kept.len() > MAX_SCOPES {
        return Err(ScopeProblem::TooMany { count: kept.len() });
    }
    Ok(kept)
}

/// What a caller demands of a key's scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Requirement<'a> {
    /// The one-argument forms: scopes are not looked at.
    None,
    /// Every one of these scopes. `None` elements (SQL NULLs) can never be held.
    All(&'a [Option<&'a str>]),
    /// The requirement itself was NULL: nothing can satisfy it (fail closed).
    Unknown,
}

/// Whether a key holding `held` (NULL = unrestricted) satisfies `required`.
pub(crate) fn satisfies(held: Option<&[String]>, required: Requirement<'_>) -> bool {
    match required {
        Requirement::None => true,
        Requirement::Unknown => false,
        Requirement::All(wanted) => wanted.iter().all(|want| match (want, held) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(want), Some(held)) => held.iter().any(|h| h == want),
        }),
    }
}

/// The verdict on a stored key, in the order `mk_verify_detail` reports it
/// (the first that applies wins; `malformed` and `not_found` come before,
/// with no row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyStatus {
    Revoked,
    Expired,
    InsufficientScope,
    /// 0.4.0: the key has a rate limit and this server cannot keep one
    /// (makima_keys is not preloaded, or its bucket hash is full). Fails
    /// closed.
    RateLimitUnavailable,
    /// 0.4.0: the key's rate limit refuses this call now.
    RateLimited,
    /// The key has credits and this call could not spend them here: a
    /// read-only transaction, a standby, parallel mode, or a table lock it
    /// would have had to wait for. Fails closed.
    UsageUnavailable,
    /// The key has fewer credits than the call's cost.
    UsageExceeded,
    Valid,
}

impl KeyStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
            KeyStatus::InsufficientScope => "insufficient_scope",
            KeyStatus::RateLimitUnavailable => "rate_limit_unavailable",
            KeyStatus::RateLimited => "rate_limited",
            KeyStatus::UsageUnavailable => "usage_unavailable",
            KeyStatus::UsageExceeded => "usage_exceeded",
            KeyStatus::Valid => "valid",
        }
    }
}

/// Timestamps are PostgreSQL's: microseconds since 2000-01-01 UTC.
pub(crate) type Micros = i64;

/// "Live", as the store's statements select keys: not revoked, or revoked
/// with a date still ahead (a grace period). The SQL form of
/// [`status`] being anything but [`KeyStatus::Revoked`].
pub(crate) const LIVE_SQL: &str =
    "(revoked_at IS NULL OR revoked_at > pg_catalog.clock_timestamp())";

/// The status of a key row at instant `now`. A `revoked_at` in the future
/// is the end of a rotation's grace period: the key still works until then.
pub(crate) fn status(
    revoked_at: Option<Micros>,
    expires_at: Option<Micros>,
    now: Micros,
    scopes_ok: bool,
) -> KeyStatus {
    if revoked_at.is_some_and(|t| t <= now) {
        KeyStatus::Revoked
    } else if expires_at.is_some_and(|t| t <= now) {
        KeyStatus::Expired
    } else if !scopes_ok {
        KeyStatus::InsufficientScope
    } else {
        KeyStatus::Valid
    }
}

/// Whether a verification at `now` (the transaction start) should write
/// `last_used_at`: never written yet, or written `interval_secs` or more
/// before. Throttled so that a hot key is not written on every call.
pub(crate) fn last_used_due(last_used_at: Option<Micros>, now: Micros, interval_secs: i32) -> bool {
    last_used_at.is_none_or(|last_used| {
        last_used <= now.saturating_sub(i64::from(interval_secs) * 1_000_000)
    })
}

/// What a rotation gives the new key for an option the caller did not
/// pass: the active key's. A rotation never widens what a key may do, so
/// scopes and metadata left out are inherited, never dropped.
pub(crate) fn inherited<T>(given: Option<T>, from_active: Option<T>) -> Option<T> {
    given.or(from_active)
}

/// The active key's lifetime, as a rotation passes it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifetime {
    pub created_at: Micros,
    pub expires_at: Micros,
}

/// The new key's expiry after a rotation at `now`: the one given, or else
/// as long from now as the active key was given when it was issued (a key
/// issued for 30 days is rotated into another 30-day key). Saturates
/// instead of overflowing; the caller stores anything past the last
/// timestamp as `infinity`.
pub(crate) fn rotated_expiry(
    given: Option<Micros>,
    active: Option<Lifetime>,
    now: Micros,
) -> Option<Micros> {
    given.or_else(|| active.map(|l| now.saturating_add(l.expires_at.saturating_sub(l.created_at))))
}

/// A refill period, as PostgreSQL stores an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Every {
    pub(crate) months: i32,
    pub(crate) days: i32,
    pub(crate) micros: i64,
}

impl Every {
    /// A refill period must move time forward in every month: no negative
    /// part, and not all zero ('1 month -30 days' is refused).
    pub(crate) fn is_valid(self) -> bool {
        self.months >= 0
            && self.days >= 0
            && self.micros >= 0
            && (self.months, self.days, self.micros) != (0, 0, 0)
    }
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Days from 1970-01-01 to a civil date (proleptic Gregorian), after
/// Howard Hinnant's `days_from_civil`.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The civil date of a count of days from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    days_from_civil(year + i64::from(month == 12), month % 12 + 1, 1)
        - days_from_civil(year, month, 1)
}

/// Days from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_DAYS: i64 = 10_957;

/// `at + times * every` as PostgreSQL computes `timestamp + interval` in
/// UTC: months first (the day of the month kept, or the month's last day if
/// it has fewer), then days, then the time. `None` past any timestamp.
pub(crate) fn add_every(at: Micros, every: Every, times: i64) -> Option<Micros> {
    let months = i64::from(every.months).checked_mul(times)?;
    let days = i64::from(every.days).checked_mul(times)?;
    let micros = every.micros.checked_mul(times)?;
    let day_number = at.div_euclid(MICROS_PER_DAY) + PG_EPOCH_DAYS;
    let time_of_day = at.rem_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(day_number);
    let month_index = (year.checked_mul(12)?)
        .checked_add(month - 1)?
        .checked_add(months)?;
    let (year, month) = (month_index.div_euclid(12), month_index.rem_euclid(12) + 1);
    if !(-4_713..=294_276).contains(&year) {
        return None;
    }
    let day = day.min(days_in_month(year, month));
    let day_number = days_from_civil(year, month, day).checked_add(days)? - PG_EPOCH_DAYS;
    day_number
        .checked_mul(MICROS_PER_DAY)?
        .checked_add(time_of_day)?
        .checked_add(micros)
}

/// When a key that refills every `every` was last refilled at
/// `refilled_at`, and it is now `now`: the new `refilled_at` if a refill is
/// due (`refilled_at + every <= now`), `None` if not. The new value is
/// reached by adding `every` one period at a time, as the next refill will
/// be computed from it, and is the last such point not after `now`: the
/// next refill is then always after `now`, so a refill can never happen
/// twice for one period.
pub(crate) fn refill_due(refilled_at: Micros, every: Every, now: Micros) -> Option<Micros> {
    if !every.is_valid() || add_every(refilled_at, every, 1)? > now {
        return None;
    }
    if every.months == 0 {
        // A fixed length: whole periods by division.
        let length = i64::from(every.days) * MICROS_PER_DAY + every.micros;
        return add_every(refilled_at, every, (now - refilled_at) / length);
    }
    // Calendar months: one step at a time (at most one per 28 days).
    let mut at = refilled_at;
    while let Some(next) = add_every(at, every, 1).filter(|&next| next <= now) {
        at = next;
    }
    Some(at)
}

/// What a key with credits holds at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Credits {
    pub(crate) remaining: i32,
    /// `refill_amount`, `refill_every` and `refilled_at`, for a key that refills.
    pub(crate) refill: Option<(i32, Every, Micros)>,
}

/// The credits a key can spend at `now`, after a lazy refill: a due refill
/// sets them to `refill_amount` (unused credits do not pile up) and moves
/// `refilled_at` on. Returns the credits and the new `refilled_at`, if a
/// refill happened.
pub(crate) fn available(credits: Credits, now: Micros) -> (i32, Option<Micros>) {
    match credits.refill {
        Some((amount, every, refilled_at)) => match refill_due(refilled_at, every, now) {
            Some(anchor) => (amount, Some(anchor)),
            None => (credits.remaining, None),
        },
        None => (credits.remaining, None),
    }
}

/// When the key's next refill happens, after `refilled_at` (as it will be
/// once `available` ran): `None` for a key that never refills.
pub(crate) fn next_refill(credits: Credits, refilled_at: Option<Micros>) -> Option<Micros> {
    let (_, every, stored) = credits.refill?;
    add_every(refilled_at.unwrap_or(stored), every, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn scopes_are_deduplicated_in_order() {
        let got = normalize_scopes([Some("write"), Some("read"), Some("write")]).unwrap();
        assert_eq!(got, strings(&["write", "read"]));
        assert_eq!(normalize_scopes([]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn bad_scopes_are_refused_with_their_position() {
        assert_eq!(
            normalize_scopes([Some("read"), None]),
            Err(ScopeProblem::NullElement)
        );
        for bad in ["", "a b", "tab\there", "nl\n", "\u{7f}"] {
            assert_eq!(
                normalize_scopes([Some("ok"), Some(bad)]),
                Err(ScopeProblem::Invalid { position: 2 }),
                "{bad:?}"
            );
        }
        let long = "x".repeat(MAX_SCOPE_CHARS + 1);
        assert!(normalize_scopes([Some(long.as_str())]).is_err());
        let at_limit = "é".repeat(MAX_SCOPE_CHARS);
        assert!(normalize_scopes([Some(at_limit.as_str())]).is_ok());
    }

    #[test]
    fn too_many_scopes_are_refused_after_deduplication() {
        let names: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
        let many = normalize_scopes(names.iter().map(|s| Some(s.as_str())));
        assert_eq!(
            many,
            Err(ScopeProblem::TooMany {
                count: MAX_SCOPES + 1
            })
        );
        let repeated = vec![Some("same"); MAX_SCOPES * 2];
        assert_eq!(normalize_scopes(repeated).unwrap(), strings(&["same"]));
    }

    #[test]
    fn requirements() {
        let rw = strings(&["read", "write"]);
        let none_held: Vec<String> = vec![];
        let read = [Some("read")];
        let admin = [Some("admin")];
        let with_null = [Some("read"), None];
        assert!(satisfies(Some(&rw), Requirement::All(&read)));
        assert!(!satisfies(Some(&rw), Requirement::All(&admin)));
        assert!(!satisfies(Some(&rw), Requirement::All(&with_null)));
        // NULL scopes: unrestricted. '{}': holds nothing.
        assert!(satisfies(None, Requirement::All(&admin)));
        assert!(!satisfies(Some(&none_held), Requirement::All(&read)));
        // An empty requirement is met by any key; an unknown one by none.
        assert!(satisfies(Some(&none_held), Requirement::All(&[])));
        assert!(!satisfies(None, Requirement::Unknown));
        assert!(satisfies(Some(&none_held), Requirement::None));
        // Exact, case-sensitive names.
        assert!(!satisfies(Some(&rw), Requirement::All(&[Some("READ")])));
    }

    #[test]
    fn status_order_and_grace() {
        let now = 1_000;
        assert_eq!(status(None, None, now, true), KeyStatus::Valid);
        // Grace period: revoked_at still ahead.
        assert_eq!(status(Some(now + 1), None, now, true), KeyStatus::Valid);
        assert_eq!(status(Some(now), None, now, true), KeyStatus::Revoked);
        assert_eq!(status(None, Some(now), now, true), KeyStatus::Expired);
        assert_eq!(status(None, Some(now + 1), now, true), KeyStatus::Valid);
        // Revoked beats expired beats scopes.
        assert_eq!(status(Some(1), Some(1), now, false), KeyStatus::Revoked);
        assert_eq!(status(None, Some(1), now, false), KeyStatus::Expired);
        assert_eq!(status(None, None, now, false), KeyStatus::InsufficientScope);
    }

    #[test]
    fn last_used_is_due_when_never_written_or_older_than_the_interval() {
        let second = 1_000_000;
        let now = 100 * second;
        assert!(last_used_due(None, now, 60));
        assert!(last_used_due(Some(now - 60 * second), now, 60));
        assert!(!last_used_due(Some(now - 60 * second + 1), now, 60));
        assert!(!last_used_due(Some(now), now, 60));
        // Interval 0: due whenever the stored time is not ahead of now.
        assert!(last_used_due(Some(now), now, 0));
        assert!(!last_used_due(Some(now + 1), now, 0));
        // Far in the past, no overflow.
        assert!(last_used_due(Some(i64::MIN), i64::MIN + 5, i32::MAX));
    }

    #[test]
    fn a_rotation_inherits_what_is_not_given() {
        assert_eq!(inherited(Some(1), Some(2)), Some(1));
        assert_eq!(inherited(None, Some(2)), Some(2));
        assert_eq!(inherited::<i32>(None, None), None);
        // Given '{}' (no scopes) is kept, not replaced by the active key's.
        let none: Vec<String> = vec![];
        assert_eq!(
            inherited(Some(none.clone()), Some(strings(&["read"]))),
            Some(none)
        );
    }

    #[test]
    fn a_rotated_key_lives_as_long_as_the_active_one_was_given() {
        let day = 86_400 * 1_000_000;
        let active = Lifetime {
            created_at: 10 * day,
            expires_at: 40 * day,
        };
        assert_eq!(rotated_expiry(None, Some(active), 50 * day), Some(80 * day));
        // An expiry given wins; no active expiry, none inherited.
        assert_eq!(rotated_expiry(Some(day), Some(active), 50 * day), Some(day));
        assert_eq!(rotated_expiry(None, None, 50 * day), None);
        // An infinite expiry stays at the top instead of wrapping around.
        let forever = Lifetime {
            created_at: -day,
            expires_at: i64::MAX,
        };
        assert_eq!(rotated_expiry(None, Some(forever), day), Some(i64::MAX));
    }

    /// 2000-01-01 00:00 UTC plus days, as PostgreSQL's microseconds.
    fn date(year: i64, month: i64, day: i64) -> Micros {
        (days_from_civil(year, month, day) - PG_EPOCH_DAYS) * MICROS_PER_DAY
    }

    const MONTH: Every = Every {
        months: 1,
        days: 0,
        micros: 0,
    };
    const DAY: Every = Every {
        months: 0,
        days: 1,
        micros: 0,
    };

    #[test]
    fn civil_dates_round_trip() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(date(2000, 1, 1), 0);
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2100, 2), 28);
        assert_eq!(days_in_month(2000, 2), 29);
        assert_eq!(days_in_month(2023, 12), 31);
    }

    #[test]
    fn intervals_add_as_postgresql_adds_them_in_utc() {
        // '2024-01-31' + '1 month' = '2024-02-29'; + '2 months' = '2024-03-31'.
        assert_eq!(
            add_every(date(2024, 1, 31), MONTH, 1),
            Some(date(2024, 2, 29))
        );
        assert_eq!(
            add_every(date(2024, 1, 31), MONTH, 2),
            Some(date(2024, 3, 31))
        );
        assert_eq!(
            add_every(date(2023, 12, 15), MONTH, 1),
            Some(date(2024, 1, 15))
        );
        assert_eq!(
            add_every(date(2024, 3, 1), MONTH, -1),
            Some(date(2024, 2, 1))
        );
        // Months, then days, then time: '1 mon 1 day 01:00'.
        let mixed = Every {
            months: 1,
            days: 1,
            micros: 3_600_000_000,
        };
        assert_eq!(
            add_every(date(2024, 1, 31), mixed, 1),
            Some(date(2024, 3, 1) + 3_600_000_000)
        );
        // Before 2000 too.
        assert_eq!(
            add_every(date(1999, 12, 31), DAY, 1),
            Some(date(2000, 1, 1))
        );
        assert_eq!(add_every(0, MONTH, i64::MAX), None);
    }

    #[test]
    fn a_refill_moves_on_by_whole_periods() {
        let start = date(2024, 1, 1) + 5;
        // Not due before a whole period has passed.
        assert_eq!(refill_due(start, DAY, date(2024, 1, 2)), None);
        assert_eq!(
            refill_due(start, DAY, date(2024, 1, 2) + 5),
            Some(date(2024, 1, 2) + 5)
        );
        // Ten days and a bit: moved on by ten whole days, never past now.
        assert_eq!(
            refill_due(start, DAY, date(2024, 1, 11) + 7),
            Some(date(2024, 1, 11) + 5)
        );
        // Monthly over years, with months of every length.
        let jan31 = date(2020, 1, 31);
        let now = date(2024, 7, 30);
        let anchor = refill_due(jan31, MONTH, now).unwrap();
        // One month at a time: Jan 31, Feb 29 (2020), Mar 29, ..., Feb 28
        // (2021), Mar 28, ..., Jul 28 2024.
        assert_eq!(anchor, date(2024, 7, 28));
        assert!(add_every(anchor, MONTH, 1).unwrap() > now);
        // The next refill is never due at once.
        for days in 0..400 {
            let now = date(2021, 1, 1) + days * MICROS_PER_DAY + 12_345;
            if let Some(anchor) = refill_due(jan31, MONTH, now) {
                assert!(anchor <= now && add_every(anchor, MONTH, 1).unwrap() > now);
                assert_eq!(refill_due(anchor, MONTH, now), None);
            }
        }
        // A one-minute period idle for ten years: exact, and quick.
        let minute = Every {
            months: 0,
            days: 0,
            micros: 60_000_000,
        };
        let later = start + 10 * 365 * MICROS_PER_DAY + 59_000_000;
        assert_eq!(
            refill_due(start, minute, later),
            Some(start + 10 * 365 * MICROS_PER_DAY)
        );
        // An invalid period never refills.
        let backwards = Every {
            months: 1,
            days: -30,
            micros: 0,
        };
        assert!(!backwards.is_valid());
        assert_eq!(refill_due(start, backwards, later), None);
    }

    #[test]
    fn credits_refill_to_the_amount_and_do_not_pile_up() {
        let start = date(2024, 1, 1);
        let refilling = Credits {
            remaining: 7,
            refill: Some((100, DAY, start)),
        };
        assert_eq!(available(refilling, start + 1), (7, None));
        assert_eq!(
            available(refilling, date(2024, 1, 3) + 1),
            (100, Some(date(2024, 1, 3)))
        );
        assert_eq!(next_refill(refilling, None), Some(date(2024, 1, 2)));
        assert_eq!(
            next_refill(refilling, Some(date(2024, 1, 3))),
            Some(date(2024, 1, 4))
        );
        let fixed = Credits {
            remaining: 3,
            refill: None,
        };
        assert_eq!(available(fixed, i64::MAX), (3, None));
        assert_eq!(next_refill(fixed, None), None);
    }
}
