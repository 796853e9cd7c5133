"""The benchmark harness: TRP against the decomposition baselines (see benchmarks/README.md).

Modules, in dependency order (each imports only those above it):

* :mod:`benchmarks.common`: method and scheme lists, shared helpers, how paths are recorded;
* :mod:`benchmarks.targets`: the issue's five targets checked from a results document;
* :mod:`benchmarks.reporting`: ``results.md``, the accuracy/speed-up plot, the machine;
* :mod:`benchmarks.running`: training, compression, timing and latency measurements;
* :mod:`benchmarks.document`: the results document assembled from the measurements;
* ``benchmarks/run.py``: the command line (``python benchmarks/run.py --help``).
"""
