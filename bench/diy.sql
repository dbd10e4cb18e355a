-- The do-it-yourself baseline our users would write, over the same api_keys
-- rows as makima_keys, with PostgreSQL's built-in sha256() (pgcrypto's
-- digest() gives the same bytes, but the PostgreSQL 18 tree we test on has no
-- pgcrypto). Lives in its own schema.
CREATE SCHEMA diy;

-- Hash, look up, and stamp last_used_at on every call.
CREATE FUNCTION diy.diy_verify(p_key text) RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
    v_user uuid;
BEGIN
    SELECT id, user_id INTO v_id, v_user
      FROM public.api_keys
     WHERE key_hash = encode(sha256(convert_to(p_key, 'UTF8')), 'hex') AND revoked_at IS NULL;
    IF v_id IS NOT NULL THEN
        UPDATE public.api_keys SET last_used_at = now() WHERE id = v_id;
    END IF;
    RETURN v_user;
END $$;

-- The same without the write.
CREATE FUNCTION diy.diy_verify_ro(p_key text) RETURNS uuid LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT user_id FROM public.api_keys
             WHERE key_hash = encode(sha256(convert_to(p_key, 'UTF8')), 'hex') AND revoked_at IS NULL);
END $$;

CREATE FUNCTION diy.diy_issue_key(p_user uuid) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    -- 32 bytes from the server's CSPRNG (two version-4 uuids, 244 random bits).
    v_key text := 'mk_' || replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
BEGIN
    INSERT INTO public.api_keys (user_id, key_hash, key_prefix)
    VALUES (p_user, encode(sha256(convert_to(v_key, 'UTF8')), 'hex'), left(v_key, 9));
    RETURN v_key;
END $$;
