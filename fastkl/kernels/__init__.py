"""Numba kernels over flat buffers: the only place where the math happens.

`dense` holds the kernels of dense rows (one per input family, `dense.KERNELS`),
`sparse` the kernel of sparse top-k rows (`sparse.sparse_rows`),
`fastmath` the vectorisable log/exp they inline. Modules here import only
numpy, numba and each other: nothing of Arrow, options or jobs. Internal:
the public API is `fastkl` itself.

This file imports nothing, on purpose: `fastkl.kernels.dense` is always the
module (never shadowed by a name re-exported here), so tests can patch it.
"""
