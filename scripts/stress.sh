#!/usr/bin/env bash
# The reliability tests with long counts: races between sessions, a postmaster
# killed under load, memory over many verifications, and the shared tier's
# memory over many distinct keys. The suite runs them with 200 iterations per
# race, 1,000,000 verifications and 20,000 distinct keys; this runs, by
# default, 5,000 iterations per race, 10,000,000 verifications and 1,000,000
# distinct keys (about 25 minutes).
# It runs on PostgreSQL 15; MK_TEST_VERSIONS="15 16 18" runs it on each major.
#   MK_RACE_ITERATIONS=N MK_VERIFY_CALLS=N MK_SHARED_KEYS=N bash scripts/stress.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export MK_RACE_ITERATIONS=${MK_RACE_ITERATIONS:-5000}
export MK_VERIFY_CALLS=${MK_VERIFY_CALLS:-10000000}
export MK_RANDOMNESS_KEYS=${MK_RANDOMNESS_KEYS:-1000000}
export MK_SHARED_KEYS=${MK_SHARED_KEYS:-1000000}
MK_TEST_VERSIONS=${MK_TEST_VERSIONS:-15} MK_CLIENT_TESTS_ONLY=1 exec bash scripts/test.sh -s \
    tests/clients/test_reliability.py tests/clients/test_privileges_and_races.py \
    "tests/clients/test_security.py::test_keys_from_many_backends_are_unique_and_uniform" \
    "tests/clients/test_shared_memory.py::test_memory_and_the_shared_hash_stay_flat_over_many_distinct_keys"
