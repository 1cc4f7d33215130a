"""Adapters: user input (NumPy, Arrow, masked arrays) -> the flat buffers per side the kernels read.

`arrow` serves dense rows (list, large_list and fixed-size list arrays, 2-D
arrays); sparse and sequence inputs will get adapters of their own here. An
adapter may know Arrow and NumPy but never options beyond its arguments, jobs
or files. Internal: the public API is `fastkl` itself. Imports nothing, on
purpose (module paths stay patchable).
"""
