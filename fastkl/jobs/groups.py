"""`group_by`: which group each row of a batch belongs to (README: Group-by summaries).

A task splits its batch's results by the values of the grouping column and
hands them to `PartStats.from_result`, which keeps one mergeable state per
value (fastkl.summary.stats). Values are Python str, int or bool; null is its
own group (None). A dictionary column groups by its decoded values, so two
files with different dictionaries still agree on the groups. A hive
partition key (a directory `lang=en/`) groups too: one value per file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..io.sources import Columns


def batch_groups(batch: pa.RecordBatch, cols: Columns, partition: tuple) -> tuple[list, np.ndarray]:
    """(keys, codes): row i of `batch` is in the group keys[codes[i]]."""
    n = batch.num_rows
    if cols.group_partition:
        value = dict(partition).get(cols.group_by)  # None: a null partition (__HIVE_DEFAULT_PARTITION__)
        if value is not None and cols.group_type is not None and pa.types.is_integer(cols.group_type):
            value = int(value)
        return [value], np.zeros(n, np.intp)
    arr = batch.column(cols.group_by)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_null(arr.type):  # an empty shard written by pandas: no values at all
        return [None], np.zeros(n, np.intp)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    enc = pc.dictionary_encode(arr, null_encoding="encode")
    return enc.dictionary.to_pylist(), enc.indices.to_numpy(zero_copy_only=False).astype(np.intp, copy=False)
