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

REVOKE ALL ON FUNCTION mk_issue_key(uuid, text, interval, text[], jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_rotate_key(uuid, text, interval, text[], jsonb, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke_user_keys(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke_key(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify(text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify_detail(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify_detail(text, text[]) FROM PUBLIC;
