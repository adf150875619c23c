"""Benchmark harness of the fused kernels (``harness``): one memory measure, one launcher, one
JSON layout. It sits outside the library's import graph: nothing in core or the kernels imports
it (an import-linter contract); each project's bench script defines its cases and calls it."""
