-- The client scenario in psql, as an administrator would type it.
--   psql -X -v ON_ERROR_STOP=1 -v nogrant=ROLE -f scenario.sql
-- Each check is a query whose result must be true; check() stops the script
-- otherwise, and ON_ERROR_STOP turns that into a non-zero exit.
\set QUIET on
CREATE FUNCTION pg_temp.check(step text, ok boolean) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN RAISE EXCEPTION 'FAIL %', step; END IF;
    RETURN 'ok ' || step;
END $$;
\pset tuples_only on
\pset format unaligned

INSERT INTO users (email) VALUES ('psql@example.com') RETURNING id AS u \gset
SELECT id AS key_id, key, key_prefix FROM mk_issue_key(:'u', 'client-psql') \gset
SELECT pg_temp.check('issue', length(:'key') = 52 AND left(:'key', 3) = 'mk_' AND :'key_prefix' = left(:'key', 9));
SELECT pg_temp.check('hash', key_hash = encode(sha256(convert_to(:'key', 'UTF8')), 'hex'))
  FROM api_keys WHERE id = :'key_id';
SELECT pg_temp.check('verify good', mk_verify(:'key') = :'u');
SELECT overlay(:'key' PLACING CASE substr(:'key', 11, 1) WHEN 'a' THEN 'b' ELSE 'a' END FROM 11 FOR 1) AS bad \gset
SELECT pg_temp.check('verify bad', mk_verify(:'bad') IS NULL AND (SELECT status FROM mk_verify_detail(:'bad')) = 'malformed');
SELECT pg_temp.check('verify unknown', mk_verify('not-a-key') IS NULL AND (SELECT status FROM mk_verify_detail('not-a-key')) = 'not_found');

\set ON_ERROR_STOP off
SELECT mk_issue_key(:'u');
\set ON_ERROR_STOP on
SELECT pg_temp.check('duplicate issue', :'LAST_ERROR_SQLSTATE' = '23505');

SELECT id AS new_id, key AS new_key FROM mk_rotate_key(:'u') \gset
SELECT pg_temp.check('rotate', mk_verify(:'key') IS NULL AND mk_verify(:'new_key') = :'u'
                               AND (SELECT status FROM mk_verify_detail(:'key')) = 'revoked');
SELECT mk_revoke(:'new_id') AS first \gset
SELECT mk_revoke(:'new_id') AS second \gset
SELECT pg_temp.check('revoke', :'first' AND NOT :'second' AND mk_verify(:'new_key') IS NULL);

\set ON_ERROR_STOP off
SET ROLE :"nogrant";
SELECT mk_issue_key(gen_random_uuid());
\set ON_ERROR_STOP on
RESET ROLE;
SELECT pg_temp.check('no grant', :'LAST_ERROR_SQLSTATE' = '42501');
