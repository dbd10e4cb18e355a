-- Every error of the function table, with its SQLSTATE.
\set VERBOSITY default
\set SHOW_CONTEXT never
\set bob '\'00000000-0000-0000-0000-000000000b0b\''

SELECT mk_issue_key(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT mk_issue_key(:bob, repeat('n', 256));
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) FROM mk_issue_key(:bob, repeat('n', 255));
SELECT mk_issue_key(:bob);
\echo :LAST_ERROR_SQLSTATE
SELECT mk_rotate_key(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT mk_revoke(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT mk_revoke('00000000-0000-0000-0000-000000000000');
\echo :LAST_ERROR_SQLSTATE
SELECT mk_revoke_user_keys(NULL);
\echo :LAST_ERROR_SQLSTATE
-- PostgreSQL 18 prints this range with its unit: expected/errors_1.out holds that.
SET makima_keys.last_used_interval = -5;
\echo :LAST_ERROR_SQLSTATE

-- Hostile input to the verification functions is never an error.
SELECT mk_verify(NULL) IS NULL AS null_in,
       mk_verify('') IS NULL AS empty_in,
       mk_verify(repeat('x', 1048576)) IS NULL AS one_megabyte,
       mk_verify(E'mk_\t\r\n\\') IS NULL AS control_chars,
       mk_verify('🔑🔑🔑') IS NULL AS multibyte,
       mk_key_is_well_formed(repeat('x', 1048576)) AS well_formed_garbage;

-- The session is still usable after every error above.
SELECT mk_verify_detail('still alive');
