//! The SQL surface, by concern: `args` checks arguments, then `issue`,
//! `verify` and `revoke` apply `key_format`, `hashing` and `policy` and
//! call `store`; `key_text` needs no table; `v0_1_0` keeps the 0.1.0 C
//! symbols.
//!
//! Functions that touch `api_keys` are SECURITY DEFINER with
//! `search_path = pg_catalog, pg_temp`, except the verifications (see
//! `verify`); `store` qualifies the table itself.
//!
//! Functions whose SQL signature or behaviour changed in 0.2.0 have new C
//! symbols (the `_v2` Rust names): a session that still runs the 0.1.0
//! library after ALTER EXTENSION UPDATE then fails to find them, instead of
//! applying 0.1.0 rules (no expiry, no grace) to 0.2.0 keys. The 0.1.0
//! symbols stay in `v0_1_0`, without SQL of their own, for databases still
//! at 0.1.0 when this library is installed.

mod args;
mod call;
mod issue;
mod key_text;
mod revoke;
mod v0_1_0;
mod verify;
