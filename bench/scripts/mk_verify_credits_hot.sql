SELECT mk_verify((SELECT key FROM bench.ckeys WHERE i = 1));
