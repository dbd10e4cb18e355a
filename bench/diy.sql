-- The do-it-yourself baseline our users would write with pgcrypto, over the
-- same api_keys rows as makima_keys. Lives in its own schema.
CREATE SCHEMA diy;
CREATE EXTENSION pgcrypto SCHEMA diy;

-- Hash, look up, and stamp last_used_at on every call.
CREATE FUNCTION diy.diy_verify(p_key text) RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
    v_user uuid;
BEGIN
    SELECT id, user_id INTO v_id, v_user
      FROM public.api_keys
     WHERE key_hash = encode(diy.digest(p_key, 'sha256'), 'hex') AND revoked_at IS NULL;
    IF v_id IS NOT NULL THEN
        UPDATE public.api_keys SET last_used_at = now() WHERE id = v_id;
    END IF;
    RETURN v_user;
END $$;

-- The same without the write.
CREATE FUNCTION diy.diy_verify_ro(p_key text) RETURNS uuid LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT user_id FROM public.api_keys
             WHERE key_hash = encode(diy.digest(p_key, 'sha256'), 'hex') AND revoked_at IS NULL);
END $$;

CREATE FUNCTION diy.diy_issue_key(p_user uuid) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_key text := 'mk_' || encode(diy.gen_random_bytes(32), 'hex');
BEGIN
    INSERT INTO public.api_keys (user_id, key_hash, key_prefix)
    VALUES (p_user, encode(diy.digest(v_key, 'sha256'), 'hex'), left(v_key, 9));
    RETURN v_key;
END $$;
