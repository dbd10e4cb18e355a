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

-- No grant but the owner's on what this script created, whatever default
-- privileges the installing role has (ALTER DEFAULT PRIVILEGES ... GRANT
-- EXECUTE ON FUNCTIONS TO app would otherwise let a verify-only role issue
-- keys): the Privileges recipes are the only way in. PUBLIC's EXECUTE is
-- revoked below, except on the two pure functions.
DO $no_default_grants$
DECLARE
    grant_row record;
BEGIN
    FOR grant_row IN
        SELECT pg_catalog.format('FUNCTION %s', p.oid::pg_catalog.regprocedure) AS object, a.grantee
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                                      AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'makima_keys'
         CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
         WHERE a.grantee <> p.proowner AND a.grantee <> 0
        UNION
        SELECT pg_catalog.format('TABLE %s', c.oid::pg_catalog.regclass), a.grantee
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                      AND d.objid = c.oid AND d.deptype = 'e'
          JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'makima_keys'
         CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
         WHERE c.relkind = 'v' AND a.grantee <> c.relowner AND a.grantee <> 0
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON %s FROM %I', grant_row.object,
                                  (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = grant_row.grantee));
    END LOOP;
END
$no_default_grants$;

REVOKE ALL ON FUNCTION mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke_user_keys(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke_key(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify(text, text[], integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify_detail(text, text[], integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_key_stats_rows() FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_shared_status() FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_key_stats_reset() FROM PUBLIC;
REVOKE ALL ON mk_key_stats FROM PUBLIC;
