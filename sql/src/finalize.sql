-- makima_keys install, last part: privileges, once every function exists.
--
-- Nobody but the installer may issue, rotate, revoke, verify or list keys
-- until granted; README "Privileges" has the GRANTs for an application and
-- an admin role. mk_hash_key and mk_key_is_well_formed touch no table and
-- stay public.
--
-- Names are unqualified on purpose: any use of the schema placeholder makes PostgreSQL
-- refuse schema names such as has$dollar. During CREATE EXTENSION the search
-- path is the extension's schema (pg_catalog implicitly first, and pg_temp is
-- never searched for functions), so these resolve to the functions just created.

-- No function of ours may share its name with one that is not ours in the
-- extension's schema: a planted mk_verify(text) next to our mk_verify(text,
-- text[] DEFAULT '{}', integer DEFAULT 1) would make one-argument calls
-- ambiguous (42725). Checked at install and update only: nobody but trusted
-- roles may create objects in the extension's schema.
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
                         'mk_restore_user_foreign_key', 'mk_key_stats_rows', 'mk_key_stats_reset')
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

REVOKE ALL ON FUNCTION mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke_user_keys(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke_key(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify(text, text[], integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify_detail(text, text[], integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_key_stats_rows() FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_key_stats_reset() FROM PUBLIC;
REVOKE ALL ON mk_key_stats FROM PUBLIC;
