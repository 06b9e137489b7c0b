"""Tooling beside the library: benchmarks, the peer comparison and the ``sparse-tconv`` command.

- :mod:`~sparse_tconv.tools.configs`: the one table of benchmark
  configurations, shared by ``sparse-tconv bench``, ``sparse-tconv perf``
  and the asv suite.
- :mod:`~sparse_tconv.tools.timing`: the best-of timer and the machine's
  physical limits (read bandwidth, writing fresh memory, BLAS rate).
- :mod:`~sparse_tconv.tools.perf`: the performance figures
  (``sparse-tconv perf``, ``python -m sparse_tconv.tools.perf``).
- :mod:`~sparse_tconv.tools.compare`: the matrix product against direct
  kernels and peers, and the crossover map (``bench``, ``crossover``).
- :mod:`~sparse_tconv.tools.dask_bench`: the distributed operator against
  the local one.
- :mod:`~sparse_tconv.tools.norm_bench`: certified norm bounds per layer,
  or of every convolution of a model (``sparse-tconv norms [--model]``).
- :mod:`~sparse_tconv.tools.models`: ResNet-18 (torchvision's layout) and a
  small network, built in code, for ``sparse-tconv norms --model``.
- :mod:`~sparse_tconv.tools.cli`: the command line.

The library never imports this package; it imports the library's public
names (and the documented :attr:`~sparse_tconv.ConvOperator.product_form`).
"""
