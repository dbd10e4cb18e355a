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

/// The verdict on a stored key, in the order `mk_verify_detail` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyStatus {
    Revoked,
    Expired,
    InsufficientScope,
    Valid,
}

impl KeyStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
            KeyStatus::InsufficientScope => "insufficient_scope",
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
}
