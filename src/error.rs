//! Every failure our functions report on purpose, with its SQLSTATE.
//!
//! No variant holds key material: messages may name a user or a key id,
//! never a key or a hash.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("{argument} must not be null")]
    NullArgument { argument: &'static str },

    #[error("user {user_id} already has an active API key")]
    ActiveKeyExists { user_id: pgrx::Uuid },

    #[error("key name is {length} characters long; the limit is {limit}")]
    NameTooLong { length: usize, limit: usize },

    #[error("no API key with id {id}")]
    KeyNotFound { id: pgrx::Uuid },

    #[error("the operating system's random number generator failed")]
    RandomnessUnavailable,

    #[error("{argument} must be a positive interval")]
    NotPositive { argument: &'static str },

    #[error("{argument} must not be negative")]
    Negative { argument: &'static str },

    #[error("scopes must not contain NULL")]
    NullScope,

    #[error("scope {position} is not a valid scope name")]
    InvalidScope { position: usize },

    #[error("a key may hold at most {limit} scopes; {count} were given")]
    TooManyScopes { count: usize, limit: usize },

    #[error("metadata must be a JSON object, not {found}")]
    MetadataNotObject { found: String },

    #[error("metadata is {size} bytes; the limit is {limit}")]
    MetadataTooLarge { size: usize, limit: usize },

    #[error("{argument} must be at least {minimum}")]
    TooSmall {
        argument: &'static str,
        minimum: i32,
    },

    #[error("refill_amount and refill_every must be given together")]
    RefillIncomplete,

    #[error("a refill needs credits: refill_amount and refill_every come with credits")]
    RefillWithoutCredits,

    #[error("rate_limit and rate_period must be given together")]
    RateIncomplete,

    #[error("rate limits need makima_keys in shared_preload_libraries, which this server did not load it from")]
    RateLimitsUnavailable,

    #[error("makima_keys statistics need makima_keys in shared_preload_libraries, which this server did not load it from")]
    StatisticsUnavailable,

    #[error("a statement of makima_keys resolved to a table other than the extension's api_keys")]
    TableMoved,
}

impl KeyError {
    pub(crate) fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            KeyError::NullArgument { .. } => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            KeyError::ActiveKeyExists { .. } => PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
            KeyError::NameTooLong { .. } => PgSqlErrorCode::ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            KeyError::KeyNotFound { .. } => PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
            KeyError::RandomnessUnavailable => PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            KeyError::NullScope => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            KeyError::NotPositive { .. }
            | KeyError::Negative { .. }
            | KeyError::InvalidScope { .. }
            | KeyError::TooManyScopes { .. }
            | KeyError::MetadataNotObject { .. }
            | KeyError::TooSmall { .. }
            | KeyError::RefillIncomplete
            | KeyError::RefillWithoutCredits
            | KeyError::RateIncomplete => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            KeyError::RateLimitsUnavailable | KeyError::StatisticsUnavailable => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            KeyError::MetadataTooLarge { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            KeyError::TableMoved => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            KeyError::ActiveKeyExists { .. } => Some(
                "Use mk_rotate_key() to replace it in one step, or mk_revoke() it before issuing a new one.",
            ),
            KeyError::KeyNotFound { .. } => Some("List keys with: SELECT id, key_prefix FROM api_keys."),
            KeyError::RandomnessUnavailable => Some("No key was issued. Check the server's entropy source."),
            KeyError::InvalidScope { .. } => Some(
                "A scope is 1 to 64 characters with no whitespace or control characters, e.g. 'read' or 'billing:write'.",
            ),
            KeyError::MetadataNotObject { .. } => Some("Pass an object, e.g. '{\"team\": \"ops\"}'::jsonb."),
            KeyError::RefillIncomplete | KeyError::RefillWithoutCredits => Some(
                "For example: credits => 1000, refill_amount => 1000, refill_every => '1 day'.",
            ),
            KeyError::RateIncomplete => {
                Some("For example: rate_limit => 100, rate_period => '1 minute'.")
            }
            KeyError::RateLimitsUnavailable | KeyError::StatisticsUnavailable => Some(
                "Add makima_keys to shared_preload_libraries and restart the server (README, Shared memory). Nothing was written.",
            ),
            KeyError::TableMoved => Some(
                "The extension's schema or table changed while this session kept a plan; nothing was run. Call again.",
            ),
            _ => None,
        }
    }

    /// Raises the error as a Postgres ERROR. Does not return.
    pub(crate) fn raise(self, function: &'static str) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), function);
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

pub(crate) type KeyResult<T> = Result<T, KeyError>;
