\set i random(1, :keys)
SELECT diy.diy_verify_ro((SELECT key FROM bench.keys WHERE i = :i));
