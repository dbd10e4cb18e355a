SELECT mk_verify((SELECT key FROM bench.keys WHERE i = 1));
