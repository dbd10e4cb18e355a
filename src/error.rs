//! Every failure our functions report on purpose, with its SQLSTATE.
//!
//! No variant holds key material: messages may name a user or a key id,
//! never a key or a hash.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{argument} must not be null")]
    NullArgument { argument: &'static str },

    #[error("user {user_id} already has an active API key")]
    ActiveKeyExists { user_id: uuid::Uuid },

    #[error("key name is {length} characters long; the limit is {limit}")]
    NameTooLong { length: usize, limit: usize },

    #[error("no API key with id {id}")]
    KeyNotFound { id: uuid::Uuid },

    #[error("the operating system's random number generator failed")]
    RandomnessUnavailable,
}

impl KeyError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            KeyError::NullArgument { .. } => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            KeyError::ActiveKeyExists { .. } => PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
            KeyError::NameTooLong { .. } => PgSqlErrorCode::ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            KeyError::KeyNotFound { .. } => PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
            KeyError::RandomnessUnavailable => PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            KeyError::ActiveKeyExists { .. } => Some(
                "Use mk_rotate_key() to replace it in one step, or mk_revoke() it before issuing a new one.",
            ),
            KeyError::KeyNotFound { .. } => Some("List keys with: SELECT id, key_prefix FROM api_keys."),
            KeyError::RandomnessUnavailable => Some("No key was issued. Check the server's entropy source."),
            _ => None,
        }
    }

    /// Raises the error as a Postgres ERROR. Does not return.
    pub fn raise(self, function: &'static str) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), function);
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

pub type KeyResult<T> = Result<T, KeyError>;
