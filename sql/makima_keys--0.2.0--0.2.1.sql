\echo Use "ALTER EXTENSION makima_keys UPDATE TO '0.2.1'" to load this file. \quit

-- makima_keys 0.2.0 -> 0.2.1: mk_restore_user_foreign_key(). Everything else in 0.2.1
-- (the verification fixes, the adoption checks) is in the library and the
-- install script. Shipped scripts are never edited: a later change goes into
-- the next version's script.

CREATE FUNCTION mk_restore_user_foreign_key() RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $restore_fk$
DECLARE
    ext_namespace oid;
    ext_schema text;
BEGIN
    SELECT e.extnamespace, n.nspname INTO ext_namespace, ext_schema
      FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'makima_keys';
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k JOIN pg_catalog.pg_class c ON c.oid = k.conrelid
                WHERE c.relnamespace = ext_namespace AND c.relname = 'api_keys' AND k.contype = 'f') THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
                    WHERE c.relnamespace = ext_namespace AND c.relname = 'users' AND c.relkind IN ('r', 'p')
                      AND a.attname = 'id' AND a.atttypid = 'pg_catalog.uuid'::pg_catalog.regtype
                      AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'there is no table %.users with a uuid id column to reference', pg_catalog.quote_ident(ext_schema)
            USING ERRCODE = 'undefined_table',
                  HINT = 'Restore or create the users table first, then call mk_restore_user_foreign_key() again.';
    END IF;
    -- Keys of users that are not there fail the constraint's check (23503): nothing changes.
    EXECUTE pg_catalog.format(
        'ALTER TABLE %1$I.api_keys ADD CONSTRAINT api_keys_user_id_fkey
             FOREIGN KEY (user_id) REFERENCES %1$I.users(id) ON DELETE CASCADE', ext_schema);
    RETURN true;
END
$restore_fk$;

REVOKE ALL ON FUNCTION mk_restore_user_foreign_key() FROM PUBLIC;
