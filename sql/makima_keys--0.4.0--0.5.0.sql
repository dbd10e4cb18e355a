-- makima_keys 0.4.0 -> 0.5.0: the shared tier hardened, and its health in
-- mk_shared_status(). The table and every other object are unchanged; the
-- library's new behaviour (flush worker held to our own table by OID,
-- per-database shares, the checked state file) needs no SQL.
--
-- Shipped scripts are never edited: a later change goes into the next
-- version's script. Like the install script, this never uses the schema
-- placeholder; names resolve in the extension's schema, which is first on
-- the search path while an extension script runs.

\echo Use "ALTER EXTENSION makima_keys UPDATE" to load this file. \quit

-- The health of the shared tier (makima_keys in shared_preload_libraries;
-- otherwise it raises 55000): one row per database served, then the fill.
CREATE FUNCTION "mk_shared_status"() RETURNS TABLE (
	"datid" oid,
	"datname" TEXT,
	"last_outcome" TEXT,
	"last_sqlstate" TEXT,
	"last_attempt_at" timestamp with time zone,
	"last_success_at" timestamp with time zone,
	"consecutive_failures" INT,
	"next_attempt_at" timestamp with time zone,
	"keys_written_last_round" bigint,
	"keys_owed" bigint,
	"keys_tracked" bigint,
	"budgets_tracked" bigint,
	"capacity" bigint,
	"untracked_calls" bigint,
	"refused_budgets" bigint
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_shared_status_wrapper';

-- No grant but the owner's on what this update created, whatever default
-- privileges the updating role has: only the Privileges recipes let anyone in.
DO $no_default_grants$
DECLARE
    grant_row record;
BEGIN
    FOR grant_row IN
        SELECT pg_catalog.format('FUNCTION %s', p.oid::pg_catalog.regprocedure) AS object, a.grantee
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_extension e ON e.extname = 'makima_keys' AND p.pronamespace = e.extnamespace
         CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
         WHERE p.proname = 'mk_shared_status'
           AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON %s FROM %I', grant_row.object,
                                  (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = grant_row.grantee));
    END LOOP;
END
$no_default_grants$;

REVOKE ALL ON FUNCTION mk_shared_status() FROM PUBLIC;

-- No function of ours may share its name with one that is not ours in the
-- extension's schema (see the install script's finalize block).
DO $our_names$
DECLARE
    clashes text;
BEGIN
    SELECT pg_catalog.string_agg(p.oid::pg_catalog.regprocedure::text, ', ' ORDER BY 1)
      INTO clashes
      FROM pg_catalog.pg_proc p
      JOIN pg_catalog.pg_extension e ON e.extname = 'makima_keys' AND p.pronamespace = e.extnamespace
     WHERE p.proname IN ('mk_issue_key', 'mk_rotate_key', 'mk_verify', 'mk_verify_detail', 'mk_revoke',
                         'mk_revoke_user_keys', 'mk_revoke_key', 'mk_hash_key', 'mk_key_is_well_formed',
                         'mk_restore_user_foreign_key', 'mk_key_stats_rows', 'mk_key_stats_reset',
                         'mk_shared_status')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid
                          AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
                          AND d.refobjid = e.oid AND d.deptype = 'e');
    IF clashes IS NOT NULL THEN
        RAISE EXCEPTION 'functions that are not makima_keys''s have its names: %', clashes
            USING ERRCODE = 'duplicate_function',
                  HINT = 'Drop or rename them, or install makima_keys into another schema.';
    END IF;
END
$our_names$;
