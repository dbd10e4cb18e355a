-- makima_keys 0.2.1: mk_restore_user_foreign_key(), the one call that brings
-- back the api_keys -> users foreign key after a logical restore.
--
-- A dump restores CREATE EXTENSION before the application's tables, so the
-- install finds no users table and creates api_keys without the key; and
-- pg_dump never writes constraints of an extension's tables. Run after the
-- restore, this adds the constraint the install would have added. The
-- upgrade script makima_keys--0.2.0--0.2.1.sql creates the same function.
--
-- SECURITY INVOKER: adding a constraint needs the table's owner (or a
-- superuser), as the restore does anyway. Names are found by the
-- extension's schema oid and quoted with %I, never through the caller's path.

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
