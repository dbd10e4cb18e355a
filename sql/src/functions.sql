-- makima_keys install: the functions whose definitions pgrx cannot generate,
-- behind #[pg_extern(sql = false)] Rust functions in src/api/: those that
-- return their one row in materialize mode (src/one_row.rs; pgrx declares a
-- set-returning function as value-per-call), and mk_verify, which reads its
-- arguments from fcinfo (src/api/verify.rs).
-- 0.3.0 added the credit arguments and mk_verify_detail's cost and last two
-- columns; 0.4.0 the rate-limit arguments, new C symbols for the
-- verifications, and the statistics of the shared tier. The definitions
-- are otherwise those pgrx generated for 0.2.0.

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

CREATE FUNCTION "mk_verify_detail"(
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

CREATE FUNCTION "mk_verify"(
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
