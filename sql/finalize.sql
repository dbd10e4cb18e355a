-- makima_keys install, part 2: privileges, once every function exists.
--
-- Nobody but the installer may issue, rotate, revoke or verify until granted;
-- README "Privileges" has the two GRANTs for an application and an admin role.
-- mk_hash_key and mk_key_is_well_formed touch no table and stay public.

REVOKE ALL ON FUNCTION @extschema@.mk_issue_key(uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.mk_rotate_key(uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.mk_revoke(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.mk_revoke_user_keys(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.mk_verify(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.mk_verify_detail(text) FROM PUBLIC;
