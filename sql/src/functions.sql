-- makima_keys install: the functions whose definitions pgrx cannot generate,
-- behind #[pg_extern(sql = false)] Rust functions in src/api/: those that
-- return their one row in materialize mode (src/one_row.rs; pgrx declares a
-- set-returning function as value-per-call), and mk_verify, which reads its
-- arguments from fcinfo (src/api/verify.rs).
-- 0.3.0 added the credit arguments and mk_verify_detail's cost and last two
-- columns; the definitions are otherwise those pgrx generated for 0.2.0.

CREATE FUNCTION "mk_issue_key"(
	"user_id" uuid,
	"name" TEXT DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"credits" INT DEFAULT NULL,
	"refill_amount" INT DEFAULT NULL,
	"refill_every" interval DEFAULT NULL
) RETURNS TABLE (
	"id" uuid,
	"key" TEXT,
	"key_prefix" TEXT,
	"created_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_issue_key_v3_wrapper';

CREATE FUNCTION "mk_rotate_key"(
	"user_id" uuid,
	"name" TEXT DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"grace" interval DEFAULT NULL,
	"credits" INT DEFAULT NULL,
	"refill_amount" INT DEFAULT NULL,
	"refill_every" interval DEFAULT NULL
) RETURNS TABLE (
	"id" uuid,
	"key" TEXT,
	"key_prefix" TEXT,
	"created_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_rotate_key_v3_wrapper';

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
AS 'MODULE_PATHNAME', 'mk_verify_detail_v3_wrapper';

CREATE FUNCTION "mk_verify"(
	"key" TEXT,
	"required_scopes" TEXT[] DEFAULT '{}',
	"cost" INT DEFAULT 1
) RETURNS uuid
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_verify_v3_wrapper';
