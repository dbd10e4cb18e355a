-- makima_keys install, part 2: privileges, once every function exists.
--
-- Nobody but the installer may issue, rotate, revoke or verify until granted;
-- README "Privileges" has the two GRANTs for an application and an admin role.
-- mk_hash_key and mk_key_is_well_formed touch no table and stay public.
--
-- Names are unqualified on purpose: any use of the schema placeholder makes PostgreSQL
-- refuse schema names such as has$dollar. During CREATE EXTENSION the search
-- path is the extension's schema (pg_catalog implicitly first, and pg_temp is
-- never searched for functions), so these resolve to the functions just created.

REVOKE ALL ON FUNCTION mk_issue_key(uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_rotate_key(uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_revoke_user_keys(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mk_verify_detail(text) FROM PUBLIC;
