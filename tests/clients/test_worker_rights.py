"""Whose rights the shared-memory worker writes with. It connects as the
bootstrap superuser; its statements must run as the owner of api_keys, in a
security-restricted operation, with a pinned search_path, so that code the
owner attached to the table never runs with more rights than the owner's."""

import preloaded
from conftest import USERS_DDL, add_user
from preloaded import wait_for


def test_the_worker_writes_as_the_table_owner_in_a_restricted_operation():
    with preloaded.running(21, "makima_keys.flush_interval=1") as cluster:
        with cluster.connect() as su:
            su.execute("CREATE DATABASE rights TEMPLATE template0 ENCODING 'UTF8'")
            su.execute("CREATE ROLE table_owner LOGIN")
        with cluster.connect("rights") as su:
            su.execute(USERS_DDL)
            su.execute("CREATE EXTENSION makima_keys")
            user = add_user(su)
            key_id, key = su.execute("SELECT id, key FROM mk_issue_key(%s)", (user,)).fetchone()
            # The owner of the table attaches a trigger after the install (it
            # may: it owns the table), which records who runs it, with what
            # search_path, and whether it may do what only an unrestricted
            # session may (create a temporary table: table_owner has TEMP).
            su.execute("CREATE TABLE writers (who name, path text, temp_refused boolean)")
            su.execute("GRANT INSERT ON writers TO table_owner")
            su.execute("GRANT CREATE ON SCHEMA public TO table_owner")
            su.execute("ALTER TABLE api_keys OWNER TO table_owner")
            su.execute("SET ROLE table_owner")
            su.execute("""
                CREATE FUNCTION public.record_writer() RETURNS trigger LANGUAGE plpgsql AS $$
                DECLARE refused boolean := false;
                BEGIN
                    BEGIN
                        CREATE TEMP TABLE probe (a int);
                    EXCEPTION WHEN insufficient_privilege THEN
                        refused := true;
                    END;
                    INSERT INTO public.writers
                    VALUES (current_user, current_setting('search_path'), refused);
                    RETURN NEW;
                END $$""")
            su.execute("CREATE TRIGGER record_writer BEFORE UPDATE ON api_keys"
                       " FOR EACH ROW EXECUTE FUNCTION public.record_writer()")
            su.execute("RESET ROLE")
            assert su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
            wait_for(lambda: su.execute("SELECT last_used_at FROM api_keys WHERE id = %s",
                                        (key_id,)).fetchone()[0], what="the worker's write")
            assert su.execute("SELECT who, path, temp_refused FROM writers").fetchall() == [
                ("table_owner", "pg_catalog, pg_temp", True)]
