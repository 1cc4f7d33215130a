"""Benchmarks: fastkl against the machine's limits and against peers (`fastkl bench`).

`throughput` feeds `fastkl bench`, the pytest-benchmark suite (benchmarks/)
and scripts/bench_jobs.py, so all three measure the same things the same way;
the shared table of cases, the peers and the timing will split out of it here.
Nothing else in fastkl imports this room. Internal. Imports nothing, on purpose.
"""
