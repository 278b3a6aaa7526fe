"""The reference's fast paths: how the sums are computed, never what they are.

The public ops (harness.mcn.conv, harness.mcn.pool) own MatConvNet's definitions and
argument checks and call in here for the work: ``conv_gemm`` (convolutions as BLAS
products: the geometry, the thresholds and the choice of path among ``conv_rows``,
``conv_columns`` and ``conv_direct``), ``blas`` (the BLAS's xGEMM, called without the
GIL), ``pool_blocks`` (pooling split into cache-sized blocks among the cores) and
``threads`` (the worker threads they share); ``bnorm_loops``, ``pointwise_loops``,
``pool_loops`` and ``columns_loops`` (batch normalisation's, the plain ReLU's, average
pooling's and the column matrix's passes over memory as loops compiled by numba, through
``jit``).
"""
