//! Rate limits: the generic cell rate algorithm (GCRA), an exact token
//! bucket kept as one number per bucket. Pure Rust, no database.
//!
//! A limit of `L` per `period` is a bucket of `L` tokens that refills one
//! token every `period / L`. The bucket is kept as its theoretical arrival
//! time (`tat`): the instant at which it will be full again. To stay exact
//! for any `L` and `period` (a period need not divide by `L` in whole
//! microseconds) every instant is kept in units of `1 / L` microsecond, so
//! one token is exactly `period` units and the whole bucket `L * period`.
//!
//! Guarantee: from a full bucket, the calls that pass in any span of time
//! `t` cost at most `L + floor(t * L / period)` tokens in all, and when
//! demand exceeds that, exactly that many pass (up to one token's rounding
//! at each end of the span).

use crate::policy::Micros;

/// A key's limit: `per_period` tokens every `period` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateLimit {
    pub(crate) per_period: i32,
    pub(crate) period: Micros,
}

impl RateLimit {
    /// `per_period` at least 1 and a positive period: what the issuing
    /// functions accept and store.
    pub(crate) fn is_valid(self) -> bool {
        self.per_period >= 1 && self.period > 0
    }

    /// `at` in units of `1 / per_period` microsecond.
    fn scaled(self, at: Micros) -> i128 {
        i128::from(at) * i128::from(self.per_period)
    }

    /// The whole bucket, in scaled units.
    fn capacity(self) -> i128 {
        i128::from(self.period) * i128::from(self.per_period)
    }
}

/// One bucket: its theoretical arrival time, in units of `1 / per_period`
/// microsecond of the limit it was last charged under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bucket {
    pub(crate) tat: i128,
    pub(crate) limit: RateLimit,
}

/// What a charge of `cost` tokens gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Charge {
    /// Passed; the bucket holds the new state. The receipt is what a
    /// refund needs.
    Passed(Receipt),
    /// Refused: a call of that cost passes after this many microseconds.
    Limited { retry_after: Micros },
    /// Refused for ever: the cost is more than the whole bucket.
    Never,
}

/// What a passed charge drew: `cost` tokens, the last of which the bucket
/// owed until `tat` (scaled, under `limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Receipt {
    tat: i128,
    limit: RateLimit,
    cost: i32,
}

impl Bucket {
    /// A full bucket under `limit`.
    pub(crate) fn full(limit: RateLimit) -> Bucket {
        Bucket {
            tat: i128::MIN / 4,
            limit,
        }
    }

    /// The same bucket under another limit (a rotation changed it): when it
    /// is full again, in microseconds, is kept.
    fn under(self, limit: RateLimit) -> Bucket {
        if self.limit == limit {
            return self;
        }
        if !self.limit.is_valid() {
            return Bucket::full(limit);
        }
        let full_at = self.tat / i128::from(self.limit.per_period);
        Bucket {
            tat: full_at.saturating_mul(i128::from(limit.per_period)),
            limit,
        }
    }

    /// Whether the bucket is full at `now`: forgetting it then hands out
    /// nothing that was not already there.
    pub(crate) fn is_full(self, now: Micros) -> bool {
        self.tat <= self.limit.scaled(now)
    }

    /// Charges `cost` tokens at `now` under `limit`. A cost of 0 always
    /// passes and changes nothing.
    pub(crate) fn charge(&mut self, limit: RateLimit, cost: i32, now: Micros) -> Charge {
        // A limit no issuing function writes (a row changed by hand) passes
        // nothing and leaves the bucket as it is.
        if !limit.is_valid() {
            return Charge::Never;
        }
        let bucket = self.under(limit);
        if cost <= 0 {
            *self = bucket;
            return Charge::Passed(Receipt {
                tat: bucket.tat,
                limit,
                cost: 0,
            });
        }
        if cost > limit.per_period {
            *self = bucket;
            return Charge::Never;
        }
        let now_scaled = limit.scaled(now);
        let new_tat = bucket.tat.max(now_scaled) + i128::from(cost) * i128::from(limit.period);
        let allowed_at = new_tat - limit.capacity();
        if allowed_at <= now_scaled {
            *self = Bucket {
                tat: new_tat,
                limit,
            };
            Charge::Passed(Receipt {
                tat: new_tat,
                limit,
                cost,
            })
        } else {
            *self = bucket;
            // Round up to whole microseconds: retrying that late passes.
            let per = i128::from(limit.per_period);
            let wait = (allowed_at - now_scaled + per - 1) / per;
            Charge::Limited {
                retry_after: Micros::try_from(wait).unwrap_or(Micros::MAX),
            }
        }
    }

    /// Gives back what a charge drew (the call failed for another reason
    /// before it passed), at `now`: only the part the bucket still owes.
    /// Tokens that time has earned back since are not given a second time,
    /// so a late refund never lets more than the limit through.
    pub(crate) fn refund(&mut self, receipt: Receipt, now: Micros) {
        if self.limit != receipt.limit || receipt.cost <= 0 {
            return;
        }
        let drawn = i128::from(receipt.cost) * i128::from(receipt.limit.period);
        let still_owed = (receipt.tat - receipt.limit.scaled(now)).clamp(0, drawn);
        self.tat -= still_owed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Micros = 1_000_000;

    fn limit(per_period: i32, period: Micros) -> RateLimit {
        RateLimit { per_period, period }
    }

    fn passed(charge: Charge) -> bool {
        matches!(charge, Charge::Passed(_))
    }

    #[test]
    fn a_full_bucket_passes_exactly_its_limit_at_once() {
        let l = limit(5, 60 * SECOND);
        let mut b = Bucket::full(l);
        let now = 1_000 * SECOND;
        let passed = (0..20).filter(|_| passed(b.charge(l, 1, now))).count();
        assert_eq!(passed, 5);
    }

    #[test]
    fn one_token_comes_back_every_period_over_limit() {
        let l = limit(5, 60 * SECOND);
        let mut b = Bucket::full(l);
        let t0 = 1_000 * SECOND;
        for _ in 0..5 {
            assert!(passed(b.charge(l, 1, t0)));
        }
        assert_eq!(
            b.charge(l, 1, t0),
            Charge::Limited {
                retry_after: 12 * SECOND
            }
        );
        assert!(matches!(
            b.charge(l, 1, t0 + 12 * SECOND - 1),
            Charge::Limited { retry_after: 1 }
        ));
        assert!(passed(b.charge(l, 1, t0 + 12 * SECOND)));
        assert!(matches!(
            b.charge(l, 1, t0 + 12 * SECOND),
            Charge::Limited { .. }
        ));
    }

    #[test]
    fn exact_when_the_period_does_not_divide_by_the_limit() {
        // 3 per 10 µs: a token every 3⅓ µs. Over 1,000,000 µs at most
        // 3 + floor(1e6 * 3 / 10) = 300,003 pass, and with a call every
        // microsecond exactly that many do.
        let l = limit(3, 10);
        let mut b = Bucket::full(l);
        let passed = (0..=1_000_000)
            .filter(|t| passed(b.charge(l, 1, *t)))
            .count();
        assert_eq!(passed, 300_003);
    }

    #[test]
    fn costs_draw_several_tokens_and_more_than_the_bucket_never_passes() {
        let l = limit(10, SECOND);
        let mut b = Bucket::full(l);
        assert_eq!(b.charge(l, 11, 0), Charge::Never);
        assert!(passed(b.charge(l, 7, 0)));
        assert_eq!(
            b.charge(l, 4, 0),
            Charge::Limited {
                retry_after: SECOND / 10
            }
        );
        assert!(passed(b.charge(l, 3, 0)));
        assert!(passed(b.charge(l, 0, 0)));
    }

    #[test]
    fn a_refund_gives_back_what_was_charged() {
        let l = limit(2, SECOND);
        let mut b = Bucket::full(l);
        let Charge::Passed(receipt) = b.charge(l, 2, 0) else {
            panic!("a full bucket passes its limit")
        };
        assert!(matches!(b.charge(l, 1, 0), Charge::Limited { .. }));
        b.refund(receipt, 0);
        assert!(passed(b.charge(l, 1, 0)));
        assert!(passed(b.charge(l, 1, 0)));
        assert!(!passed(b.charge(l, 1, 0)));
    }

    #[test]
    fn a_late_refund_never_gives_back_what_time_already_did() {
        // 2 per second. A call draws 2 at 0 and fails much later, after the
        // bucket refilled and a sibling drained it again: refunding the 2
        // then would let 4 through at once.
        let l = limit(2, SECOND);
        let mut b = Bucket::full(l);
        let Charge::Passed(receipt) = b.charge(l, 2, 0) else {
            panic!("a full bucket passes its limit")
        };
        let later = 10 * SECOND;
        assert!(passed(b.charge(l, 2, later)));
        b.refund(receipt, later);
        assert!(!passed(b.charge(l, 1, later)));
        // Half a second after the draw, one of its two tokens was earned
        // back already: the refund gives back one.
        let mut b = Bucket::full(l);
        let Charge::Passed(receipt) = b.charge(l, 2, 0) else {
            panic!("a full bucket passes its limit")
        };
        b.refund(receipt, SECOND / 2);
        assert!(passed(b.charge(l, 2, SECOND / 2)));
        assert!(!passed(b.charge(l, 1, SECOND / 2)));
    }

    #[test]
    fn a_limit_no_function_writes_passes_nothing() {
        let mut b = Bucket::full(limit(5, SECOND));
        assert_eq!(b.charge(limit(0, 1), 1, 0), Charge::Never);
        assert_eq!(b.charge(limit(5, 0), 1, 0), Charge::Never);
        assert!(passed(b.charge(limit(5, SECOND), 5, 0)));
    }

    #[test]
    fn full_again_after_one_period() {
        let l = limit(4, SECOND);
        let mut b = Bucket::full(l);
        assert!(b.is_full(0));
        assert!(passed(b.charge(l, 4, 0)));
        assert!(!b.is_full(SECOND - 1));
        assert!(b.is_full(SECOND));
    }

    #[test]
    fn a_new_limit_keeps_when_the_bucket_is_full_again() {
        let old = limit(10, SECOND);
        let new = limit(100, SECOND);
        let mut b = Bucket::full(old);
        assert!(passed(b.charge(old, 10, 0)));
        // Empty under the old limit: full again at 1 s. Under the new one
        // (a token every 10 ms) that is 100 tokens owed, so nothing passes.
        assert!(matches!(b.charge(new, 1, 0), Charge::Limited { .. }));
        assert!(passed(b.charge(new, 1, SECOND / 100)));
    }
}
