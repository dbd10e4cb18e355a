//! Every statement of ours resolves to the extension's own `api_keys`, or
//! does not run.
//!
//! Our statements name the table by schema and name, and PostgreSQL keeps
//! their plans. When a plan is invalidated (ANALYZE, autovacuum, any DDL on
//! the table) it parses the same text again, long after we wrote it: after
//! `ALTER SCHEMA ... RENAME`, the old name could then resolve to another
//! role's table, whose triggers and defaults would run with the extension
//! owner's rights. `store` prepares its statements again when a schema
//! changes, and this analysis hook is the guarantee behind it: a statement
//! that carries [`STATEMENT_MARK`], analysed while a call of ours expects a
//! table, may reference that table and nothing else. It raises before the
//! statement is rewritten, planned or run, so no code of the other table
//! runs.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::PgList;

/// The start of every statement `store` runs.
pub(crate) const STATEMENT_MARK: &str = "/* makima_keys */ ";

thread_local! {
    /// The table our running call's statements may touch: `None` outside
    /// our calls, `Some(InvalidOid)` when the table was not found (every
    /// marked statement is then refused).
    static EXPECTED: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
}

static mut PREVIOUS_HOOK: pg_sys::post_parse_analyze_hook_type = None;

/// While alive, marked statements may reference `table` only.
pub(crate) struct Expecting {
    previous: Option<pg_sys::Oid>,
}

pub(crate) fn expect(table: pg_sys::Oid) -> Expecting {
    Expecting {
        previous: EXPECTED.replace(Some(table)),
    }
}

impl Drop for Expecting {
    // Also runs when an error unwinds through the call.
    fn drop(&mut self) {
        EXPECTED.set(self.previous);
    }
}

/// Installs the hook; called once per backend from `_PG_init`.
pub(crate) fn install() {
    // SAFETY: _PG_init runs once per backend, before any query of ours;
    // chaining the previous hook is PostgreSQL's convention.
    unsafe {
        PREVIOUS_HOOK = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(check_statement);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_statement(
    pstate: *mut pg_sys::ParseState,
    query: *mut pg_sys::Query,
    jstate: *mut pg_sys::JumbleState,
) {
    // SAFETY: the hook's arguments are PostgreSQL's, valid for this call.
    unsafe {
        if let Some(previous) = PREVIOUS_HOOK {
            previous(pstate, query, jstate);
        }
        let Some(expected) = EXPECTED.get() else {
            return;
        };
        let text = (*pstate).p_sourcetext;
        if text.is_null()
            || !CStr::from_ptr(text)
                .to_bytes()
                .starts_with(STATEMENT_MARK.as_bytes())
        {
            return;
        }
        if !references_only(query, expected) {
            crate::error::KeyError::TableMoved.raise("makima_keys");
        }
    }
}

/// Whether every relation `query` reads or writes is `table`. Our statements
/// have no sublinks (their relations would not be in the range table), so a
/// query with any is refused too. A function in FROM (the flush worker's
/// `unnest` of its batch) is allowed when it is a function of pg_catalog,
/// which no role but a superuser can change.
unsafe fn references_only(query: *mut pg_sys::Query, table: pg_sys::Oid) -> bool {
    // SAFETY: an analysed Query and its range table, as PostgreSQL built them.
    unsafe {
        if (*query).hasSubLinks {
            return false;
        }
        let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable);
        for rte in rtable.iter_ptr() {
            let ok = match (*rte).rtekind {
                pg_sys::RTEKind::RTE_RELATION => {
                    table != pg_sys::InvalidOid && (*rte).relid == table
                }
                pg_sys::RTEKind::RTE_SUBQUERY => references_only((*rte).subquery, table),
                pg_sys::RTEKind::RTE_JOIN | pg_sys::RTEKind::RTE_RESULT => true,
                pg_sys::RTEKind::RTE_FUNCTION => catalog_functions_only((*rte).functions),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
        (*query).cteList.is_null()
    }
}

/// Whether every function of a FROM item is a plain function of pg_catalog.
unsafe fn catalog_functions_only(functions: *mut pg_sys::List) -> bool {
    // SAFETY: the analysed range table function list, as PostgreSQL built it.
    unsafe {
        let functions = PgList::<pg_sys::RangeTblFunction>::from_pg(functions);
        let all = functions.iter_ptr().all(|rtfunc| {
            let expr = (*rtfunc).funcexpr;
            if expr.is_null() || (*expr).type_ != pg_sys::NodeTag::T_FuncExpr {
                return false;
            }
            let funcid = (*expr.cast::<pg_sys::FuncExpr>()).funcid;
            pg_sys::get_func_namespace(funcid) == pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE)
        });
        all
    }
}
