"""The job summary: mergeable per-task state (`stats.PartStats`) and the final `stats.Summary`.

Serves the job layer (each task returns a `PartStats`, the client merges and
finalises them) and, later, reports (text, HTML). Knows nothing of files or
schedulers. Internal: the public name is `fastkl.Summary`. Imports nothing,
on purpose (module paths stay patchable).
"""
