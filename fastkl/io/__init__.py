"""Files: what a job reads and writes, and the checks that keep both honest.

`sources` finds the input files, checks their columns and cuts the work into
tasks; `filemeta` knows a file by its identity and footer and rereads it only
if it is still that file; `footer_checks` refuses Parquet footers pyarrow
would abort on; `output` stages, locks and atomically commits DEST.
Object stores: `stores` resolves a URL to a pyarrow filesystem,
`store_discovery` lists SOURCE there, `store_conditional` and
`store_output` keep the commit without rename; `cleanup` is `fastkl clean`.
Serves the job layer; knows nothing of kernels or schedulers. Internal: the public API is `fastkl`.
Imports nothing, on purpose (module paths stay patchable; no stdlib `io`
clash either, since fastkl uses absolute imports).
"""
