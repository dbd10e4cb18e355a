-- makima_keys 0.3.0 -> 0.4.0: the shared tier (makima_keys in
-- shared_preload_libraries): verifications that never write, per-key
-- statistics (mk_key_stats), exact per-user rate limits, and the worker that
-- writes last_used_at and announces keys that end by time.
--
-- Shipped scripts are never edited: a later change goes into the next
-- version's script. Like the install script, this never uses the schema
-- placeholder; names resolve in the extension's schema, which is first on
-- the search path while an extension script runs.

\echo Use "ALTER EXTENSION makima_keys UPDATE" to load this file. \quit

-- The rate-limit columns, the index of key ends and mk_keys with them: the
-- same block as a fresh install runs (sql/src/schema_0_4_0.sql).
DO $schema_0_4_0$
DECLARE
    saved_search_path text := pg_catalog.current_setting('search_path');
    ext_schema text;
    api_keys_oid oid;
    -- Name and type of each new column, in order.
    new_columns text[] := ARRAY[
        'rate_limit', 'integer',
        'rate_period', 'interval'];
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
        ELSIF found_type IS NOT NULL THEN
            -- A nullable column of the right type that already holds values
            -- is the application's own: limiting every verification by it
            -- would change what its keys do.
            EXECUTE pg_catalog.format('SELECT EXISTS (SELECT FROM %I.api_keys WHERE %I IS NOT NULL)',
                                      ext_schema, new_columns[i])
               INTO found_not_null;
            IF found_not_null THEN
                RAISE EXCEPTION '%.api_keys already has a column % that holds values',
                        pg_catalog.quote_ident(ext_schema), new_columns[i]
                    USING ERRCODE = 'invalid_table_definition',
                          HINT = 'Rename that column, then run the command again.';
            END IF;
        END IF;
    END LOOP;

    EXECUTE pg_catalog.format($ddl$
        COMMENT ON COLUMN %1$I.api_keys.rate_limit IS 'NULL: no rate limit. Otherwise calls (of cost 1) per rate_period, for all of the user''s keys together';
        COMMENT ON COLUMN %1$I.api_keys.rate_period IS 'The period of rate_limit (months count as 30 days)';

        -- The flush worker announces keys that end by time: those whose
        -- earlier end (expiry, or a grace period's end) fell since its last
        -- round. Keys that never end are not in this index.
        CREATE INDEX IF NOT EXISTS idx_api_keys_ends_at
            ON %1$I.api_keys ((LEAST(expires_at, revoked_at)))
         WHERE expires_at IS NOT NULL OR revoked_at IS NOT NULL;

        CREATE OR REPLACE VIEW %1$I.mk_keys AS
        SELECT k.id, k.user_id, k.key_prefix, k.name, k.created_at, k.last_used_at,
               k.expires_at, k.revoked_at, k.scopes, k.metadata,
               CASE WHEN k.revoked_at <= pg_catalog.clock_timestamp() THEN 'revoked'
                    WHEN k.expires_at <= pg_catalog.clock_timestamp() THEN 'expired'
                    ELSE 'valid'
               END AS status,
               k.credits, k.refill_amount, k.refill_every, k.refilled_at,
               k.rate_limit, k.rate_period
          FROM %1$I.api_keys k
        $ddl$, ext_schema);

    PERFORM pg_catalog.set_config('search_path', saved_search_path, true);
END
$schema_0_4_0$;

-- The issuing functions gain rate_limit and rate_period: the 0.3.0 forms
-- are renamed, their grants carried to the new ones (below), then dropped.
-- A defaulted form next to the old one would make calls ambiguous (42725).
ALTER FUNCTION mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval) RENAME TO mk_issue_key_0_3_0;
ALTER FUNCTION mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval) RENAME TO mk_rotate_key_0_3_0;

CREATE FUNCTION "mk_issue_key"(
	"user_id" uuid,
	"name" TEXT DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"credits" INT DEFAULT NULL,
	"refill_amount" INT DEFAULT NULL,
	"refill_every" interval DEFAULT NULL,
	"rate_limit" INT DEFAULT NULL,
	"rate_period" interval DEFAULT NULL
) RETURNS TABLE (
	"id" uuid,
	"key" TEXT,
	"key_prefix" TEXT,
	"created_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_issue_key_v4_wrapper';

CREATE FUNCTION "mk_rotate_key"(
	"user_id" uuid,
	"name" TEXT DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"grace" interval DEFAULT NULL,
	"credits" INT DEFAULT NULL,
	"refill_amount" INT DEFAULT NULL,
	"refill_every" interval DEFAULT NULL,
	"rate_limit" INT DEFAULT NULL,
	"rate_period" interval DEFAULT NULL
) RETURNS TABLE (
	"id" uuid,
	"key" TEXT,
	"key_prefix" TEXT,
	"created_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_rotate_key_v4_wrapper';

-- The verifications keep their signatures (and so their grants) and move to
-- the 0.4.0 C symbols, which read the rate-limit columns: the 0.3.0 symbols
-- never do, since before this update such columns are the application's.
CREATE OR REPLACE FUNCTION "mk_verify_detail"(
	"key" TEXT,
	"required_scopes" TEXT[] DEFAULT '{}',
	"cost" INT DEFAULT 1
) RETURNS TABLE (
	"status" TEXT,
	"key_id" uuid,
	"user_id" uuid,
	"key_prefix" TEXT,
	"name" TEXT,
	"expires_at" timestamp with time zone,
	"revoked_at" timestamp with time zone,
	"scopes" TEXT[],
	"metadata" jsonb,
	"retry_after" interval,
	"credits" INT
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_verify_detail_v4_wrapper';

CREATE OR REPLACE FUNCTION "mk_verify"(
	"key" TEXT,
	"required_scopes" TEXT[] DEFAULT '{}',
	"cost" INT DEFAULT 1
) RETURNS uuid
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_verify_v4_wrapper';

-- The statistics of the shared tier (makima_keys in shared_preload_libraries;
-- otherwise both raise 55000). Rows of this database only.
CREATE FUNCTION "mk_key_stats_rows"() RETURNS TABLE (
	"key_id" uuid,
	"valid" bigint,
	"revoked" bigint,
	"expired" bigint,
	"insufficient_scope" bigint,
	"rate_limit_unavailable" bigint,
	"rate_limited" bigint,
	"usage_exceeded" bigint,
	"usage_unavailable" bigint,
	"not_found" bigint,
	"malformed" bigint,
	"last_verified_at" timestamp with time zone,
	"last_called_at" timestamp with time zone,
	"since" timestamp with time zone
)
VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_key_stats_rows_wrapper';

CREATE VIEW mk_key_stats AS SELECT * FROM mk_key_stats_rows();
COMMENT ON VIEW mk_key_stats IS 'Verifications per key since the last reset or start (needs shared_preload_libraries); key_id NULL: calls that named no key';

CREATE FUNCTION "mk_key_stats_reset"() RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_key_stats_reset_wrapper';

-- No grant but the owner's on what this update created, whatever default
-- privileges the updating role has: only the grants carried below, and the
-- Privileges recipes, let anyone in.
DO $no_default_grants$
DECLARE
    grant_row record;
BEGIN
    FOR grant_row IN
        SELECT pg_catalog.format('FUNCTION %s', p.oid::pg_catalog.regprocedure) AS object, a.grantee
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_extension e ON e.extname = 'makima_keys' AND p.pronamespace = e.extnamespace
         CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
         WHERE p.proname IN ('mk_issue_key', 'mk_rotate_key', 'mk_key_stats_rows', 'mk_key_stats_reset')
           AND a.grantee <> p.proowner AND a.grantee <> 0
        UNION
        SELECT pg_catalog.format('TABLE %s', c.oid::pg_catalog.regclass), a.grantee
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_extension e ON e.extname = 'makima_keys' AND c.relnamespace = e.extnamespace
         CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
         WHERE c.relname = 'mk_key_stats' AND c.relkind = 'v'
           AND a.grantee <> c.relowner AND a.grantee <> 0
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON %s FROM %I', grant_row.object,
                                  (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = grant_row.grantee));
    END LOOP;
END
$no_default_grants$;

-- Privileges: none for PUBLIC, as on a fresh install; then the EXECUTE
-- grants of each replaced function carried over to its successor.
REVOKE ALL ON FUNCTION mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_key_stats_rows() FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_key_stats_reset() FROM PUBLIC;
REVOKE ALL ON mk_key_stats FROM PUBLIC;

DO $carry_grants$
DECLARE
    saved_search_path text := pg_catalog.current_setting('search_path');
    ext_namespace oid;
    replaced text[] := ARRAY[
        'mk_issue_key_0_3_0(uuid, text, interval, text[], jsonb, integer, integer, interval)',
            'mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval, integer, interval)',
        'mk_rotate_key_0_3_0(uuid, text, interval, text[], jsonb, interval, integer, integer, interval)',
            'mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval, integer, interval)'];
    old_function regprocedure;
    new_function regprocedure;
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
        FOR grant_row IN
            SELECT a.grantee, a.is_grantable
              FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
             WHERE p.oid = old_function AND a.privilege_type = 'EXECUTE'
               AND a.grantee <> p.proowner
        LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s%s',
                new_function,
                CASE WHEN grant_row.grantee = 0 THEN 'PUBLIC'
                     ELSE pg_catalog.quote_ident((SELECT r.rolname FROM pg_catalog.pg_roles r
                                                   WHERE r.oid = grant_row.grantee)) END,
                CASE WHEN grant_row.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
    END LOOP;
    -- A GRANT inside an extension script is recorded as the extension's own
    -- initial privilege, which pg_dump leaves out: these grants are the
    -- users', so the initial privileges go back to what a fresh install has
    -- (no grants beyond the owner's), and pg_dump keeps dumping them.
    FOR i IN 2 .. pg_catalog.array_length(replaced, 1) BY 2 LOOP
        new_function := replaced[i]::regprocedure;
        UPDATE pg_catalog.pg_init_privs ip
           SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
          FROM pg_catalog.pg_proc p
         WHERE p.oid = new_function AND ip.objoid = new_function
           AND ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND ip.objsubid = 0;
    END LOOP;
    PERFORM pg_catalog.set_config('search_path', saved_search_path, true);
END
$carry_grants$;

DROP FUNCTION mk_issue_key_0_3_0(uuid, text, interval, text[], jsonb, integer, integer, interval);
DROP FUNCTION mk_rotate_key_0_3_0(uuid, text, interval, text[], jsonb, interval, integer, integer, interval);

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
