-- makima_keys 0.1.0 -> 0.2.0: expiry, rotation with a grace period, scopes,
-- metadata, revocation events, mk_revoke_key and the mk_keys listing.
--
-- Shipped scripts are never edited: a later change goes into the next
-- version's script. Like the install script, this never uses the schema
-- placeholder and never names api_keys unqualified (a temporary table of
-- the same name would otherwise be altered instead).

-- The new columns and the mk_keys view: the same block as a fresh install runs.
DO $schema_0_2_0$
DECLARE
    saved_search_path text := pg_catalog.current_setting('search_path');
    ext_schema text;
    api_keys_oid oid;
    -- Name and type of each new column, in order.
    new_columns text[] := ARRAY[
        'expires_at', 'timestamp with time zone',
        'scopes', 'text[]',
        'metadata', 'jsonb'];
    found_type text;
    found_not_null boolean;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

    SELECT n.nspname INTO ext_schema
      FROM pg_catalog.pg_extension e
      JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'makima_keys';
    SELECT c.oid INTO api_keys_oid
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ext_schema AND c.relname = 'api_keys';

    FOR i IN 1 .. pg_catalog.array_length(new_columns, 1) BY 2 LOOP
        found_type := NULL;
        SELECT pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull
          INTO found_type, found_not_null
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = api_keys_oid AND a.attname = new_columns[i]
           AND a.attnum > 0 AND NOT a.attisdropped;
        IF found_type IS NULL THEN
            EXECUTE pg_catalog.format('ALTER TABLE %I.api_keys ADD COLUMN %I %s',
                                      ext_schema, new_columns[i], new_columns[i + 1]);
        ELSIF found_type <> new_columns[i + 1] OR found_not_null THEN
            -- A column of that name that the application added itself: its
            -- meaning is not ours to guess.
            RAISE EXCEPTION '%.api_keys already has a column % that is not a nullable %',
                    pg_catalog.quote_ident(ext_schema), new_columns[i], new_columns[i + 1]
                USING ERRCODE = 'invalid_table_definition',
                      DETAIL = pg_catalog.format('Found: %s%s', found_type,
                                                 CASE WHEN found_not_null THEN ' NOT NULL' ELSE '' END),
                      HINT = 'Rename that column, then run the command again.';
        END IF;
    END LOOP;

    EXECUTE pg_catalog.format($ddl$
        COMMENT ON COLUMN %1$I.api_keys.expires_at IS 'NULL if the key never expires; it stops verifying at this time';
        COMMENT ON COLUMN %1$I.api_keys.scopes IS 'NULL: unrestricted. Otherwise the scopes the key holds ({} holds none)';
        COMMENT ON COLUMN %1$I.api_keys.metadata IS 'JSON object given when the key was issued';

        CREATE VIEW %1$I.mk_keys AS
        SELECT k.id, k.user_id, k.key_prefix, k.name, k.created_at, k.last_used_at,
               k.expires_at, k.revoked_at, k.scopes, k.metadata,
               CASE WHEN k.revoked_at <= pg_catalog.clock_timestamp() THEN 'revoked'
                    WHEN k.expires_at <= pg_catalog.clock_timestamp() THEN 'expired'
                    ELSE 'valid'
               END AS status
          FROM %1$I.api_keys k;
        COMMENT ON VIEW %1$I.mk_keys IS 'API keys without their hashes, with their status now';
        REVOKE ALL ON TABLE %1$I.mk_keys FROM PUBLIC
        $ddl$, ext_schema);

    PERFORM pg_catalog.set_config('search_path', saved_search_path, true);
END
$schema_0_2_0$;

-- Functions whose behaviour changes keep their SQL signature, grants and oid
-- but move to new C symbols, so that a session still running the 0.1.0
-- library fails to find them (and reconnects) instead of applying 0.1.0
-- rules to 0.2.0 keys. mk_verify also becomes SECURITY INVOKER: its index
-- probe needs no privilege and resolves no names, and the statements it may
-- run (the last_used_at write, the SQL fallback) switch to the owner's
-- rights and a pinned search_path inside the library, so the hot path no
-- longer pays for a search_path change on every call. These functions are
-- members of this extension already, so replacing them is safe.
CREATE OR REPLACE FUNCTION "mk_verify"(
	"key" TEXT /* Option < & str > */
) RETURNS uuid /* Option < pgrx :: Uuid > */
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mk_verify_v2_wrapper';

CREATE OR REPLACE FUNCTION "mk_revoke"(
	"id" uuid /* Option < pgrx :: Uuid > */
) RETURNS bool /* bool */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mk_revoke_v2_wrapper';

CREATE OR REPLACE FUNCTION "mk_revoke_user_keys"(
	"user_id" uuid /* Option < pgrx :: Uuid > */
) RETURNS INT /* i32 */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mk_revoke_user_keys_v2_wrapper';

-- mk_issue_key, mk_rotate_key and mk_verify_detail(text) change their SQL
-- signatures, so they are replaced. The old ones are renamed first, so that
-- whoever could EXECUTE them can EXECUTE the new ones, then dropped.
ALTER FUNCTION mk_issue_key(uuid, text) RENAME TO mk_issue_key_0_1_0;
ALTER FUNCTION mk_rotate_key(uuid, text) RENAME TO mk_rotate_key_0_1_0;
ALTER FUNCTION mk_verify_detail(text) RENAME TO mk_verify_detail_0_1_0;

CREATE  FUNCTION "mk_issue_key"(
	"user_id" uuid, /* Option < pgrx :: Uuid > */
	"name" TEXT DEFAULT NULL, /* Option < & str > */
	"expires_in" interval DEFAULT NULL, /* Option < Interval > */
	"scopes" TEXT[] DEFAULT NULL, /* :: std :: option :: Option < Array < & str > > */
	"metadata" jsonb DEFAULT NULL /* Option < StoredJsonb > */
) RETURNS TABLE (
	"id" uuid,  /* pgrx :: Uuid */
	"key" TEXT,  /* String */
	"key_prefix" TEXT,  /* String */
	"created_at" timestamp with time zone  /* TimestampWithTimeZone */
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mk_issue_key_v2_wrapper';

CREATE  FUNCTION "mk_rotate_key"(
	"user_id" uuid, /* Option < pgrx :: Uuid > */
	"name" TEXT DEFAULT NULL, /* Option < & str > */
	"expires_in" interval DEFAULT NULL, /* Option < Interval > */
	"scopes" TEXT[] DEFAULT NULL, /* :: std :: option :: Option < Array < & str > > */
	"metadata" jsonb DEFAULT NULL, /* Option < StoredJsonb > */
	"grace" interval DEFAULT NULL /* Option < Interval > */
) RETURNS TABLE (
	"id" uuid,  /* pgrx :: Uuid */
	"key" TEXT,  /* String */
	"key_prefix" TEXT,  /* String */
	"created_at" timestamp with time zone  /* TimestampWithTimeZone */
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mk_rotate_key_v2_wrapper';

CREATE  FUNCTION "mk_verify_detail"(
	"key" TEXT /* Option < & str > */
) RETURNS TABLE (
	"status" TEXT,  /* String */
	"key_id" uuid,  /* Option < pgrx :: Uuid > */
	"user_id" uuid,  /* Option < pgrx :: Uuid > */
	"key_prefix" TEXT,  /* Option < String > */
	"name" TEXT,  /* Option < String > */
	"expires_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"revoked_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"scopes" TEXT[],  /* :: std :: option :: Option < Vec < String > > */
	"metadata" jsonb  /* Option < StoredJsonb > */
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mk_verify_detail_v2_wrapper';

CREATE  FUNCTION "mk_verify_detail"(
	"key" TEXT, /* Option < & str > */
	"required_scopes" TEXT[] /* :: std :: option :: Option < Array < & str > > */
) RETURNS TABLE (
	"status" TEXT,  /* String */
	"key_id" uuid,  /* Option < pgrx :: Uuid > */
	"user_id" uuid,  /* Option < pgrx :: Uuid > */
	"key_prefix" TEXT,  /* Option < String > */
	"name" TEXT,  /* Option < String > */
	"expires_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"revoked_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"scopes" TEXT[],  /* :: std :: option :: Option < Vec < String > > */
	"metadata" jsonb  /* Option < StoredJsonb > */
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mk_verify_detail_scoped_wrapper';

CREATE  FUNCTION "mk_verify"(
	"key" TEXT, /* Option < & str > */
	"required_scopes" TEXT[] /* :: std :: option :: Option < Array < & str > > */
) RETURNS uuid /* Option < pgrx :: Uuid > */
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mk_verify_scoped_wrapper';

CREATE  FUNCTION "mk_revoke_key"(
	"key" TEXT /* Option < & str > */
) RETURNS bool /* bool */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mk_revoke_key_wrapper';

-- Privileges: none for PUBLIC, as on a fresh install; then the EXECUTE grants
-- of each replaced function carried over to its successor. New capabilities
-- (scoped verification, mk_revoke_key, mk_keys) are granted to nobody: the
-- README says which GRANTs to add.
REVOKE ALL ON FUNCTION mk_issue_key(uuid, text, interval, text[], jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_rotate_key(uuid, text, interval, text[], jsonb, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke_key(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify(text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify_detail(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify_detail(text, text[]) FROM PUBLIC;

DO $carry_grants$
DECLARE
    saved_search_path text := pg_catalog.current_setting('search_path');
    ext_namespace oid;
    replaced text[] := ARRAY[
        'mk_issue_key_0_1_0(uuid, text)', 'mk_issue_key(uuid, text, interval, text[], jsonb)',
        'mk_rotate_key_0_1_0(uuid, text)', 'mk_rotate_key(uuid, text, interval, text[], jsonb, interval)',
        'mk_verify_detail_0_1_0(text)', 'mk_verify_detail(text)'];
    old_function regprocedure;
    new_function regprocedure;
    initial_acl aclitem[];
    grant_row record;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    SELECT e.extnamespace INTO ext_namespace
      FROM pg_catalog.pg_extension e WHERE e.extname = 'makima_keys';
    -- The function names below resolve in the extension's schema; type names
    -- in pg_catalog, which comes first.
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, '
        || pg_catalog.quote_ident((SELECT n.nspname FROM pg_catalog.pg_namespace n WHERE n.oid = ext_namespace))
        || ', pg_temp', true);
    FOR i IN 1 .. pg_catalog.array_length(replaced, 1) BY 2 LOOP
        old_function := replaced[i]::regprocedure;
        new_function := replaced[i + 1]::regprocedure;
        SELECT p.proacl INTO initial_acl FROM pg_catalog.pg_proc p WHERE p.oid = new_function;
        FOR grant_row IN
            SELECT a.grantee, a.is_grantable
              FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
             WHERE p.oid = old_function AND a.privilege_type = 'EXECUTE'
               AND a.grantee <> p.proowner
        LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s%s',
                replaced[i + 1]::regprocedure,
                CASE WHEN grant_row.grantee = 0 THEN 'PUBLIC'
                     ELSE pg_catalog.quote_ident((SELECT r.rolname FROM pg_catalog.pg_roles r
                                                   WHERE r.oid = grant_row.grantee)) END,
                CASE WHEN grant_row.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
        -- A GRANT inside an extension script is recorded as the extension's
        -- own initial privilege, which pg_dump leaves out: these grants are
        -- the users', so the initial privileges go back to what a fresh
        -- install has, and pg_dump keeps dumping the grants.
        UPDATE pg_catalog.pg_init_privs ip SET initprivs = initial_acl
         WHERE ip.objoid = new_function AND ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
           AND ip.objsubid = 0;
    END LOOP;
    PERFORM pg_catalog.set_config('search_path', saved_search_path, true);
END
$carry_grants$;

DROP FUNCTION mk_issue_key_0_1_0(uuid, text);
DROP FUNCTION mk_rotate_key_0_1_0(uuid, text);
DROP FUNCTION mk_verify_detail_0_1_0(text);
