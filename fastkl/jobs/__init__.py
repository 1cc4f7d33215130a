"""Jobs: `fastkl.run`, a dataset-scale computation on Dask, and what keeps it safe.

`run` plans, schedules, merges and commits a job (each task calls the same
`fastkl._engine.compute` as the in-memory API); `limits` caps its memory;
`progress` draws its bar. Uses `fastkl.io` for files and `fastkl.summary` for
the merged state. Internal: the public name is `fastkl.run`.

This file imports nothing, on purpose: `fastkl.jobs.run` must stay the module
(re-exporting the function `run` here would shadow it, and break both
`import fastkl.jobs.run as job` and the tests that patch it).
"""
