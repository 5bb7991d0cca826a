"""Side-by-side benchmark of models that compute the same thing: ``fxindex.bench``.

Typical use: compare an original model with its rebuilt GraphModule::

    report = fxindex.bench({"original": model, "rebuilt": gm}, (x,))
    print(report.table())
    report.to_json("bench.json")
    report.plot("bench.png")

Every row holds latency (median and interquartile range), throughput, speed
ratio against the baseline with a confidence interval, parameter count and
bytes, FLOPs, peak memory of the forward, how far its outputs are from the
baseline's, and whether its timing is too noisy to trust.

Where each concept lives:

- ``_bench.py``: :func:`bench`, which prepares the models and puts the rest together;
- ``_timing.py``: the interleaved rounds and when to stop them;
- ``_stats.py``: quartiles, the median's interval, paired speed ratios;
- ``_memory.py``: the peak-memory measure (a dispatch mode on CPU);
- ``_measures.py``: parameters, FLOPs and output differences;
- ``_prepare.py``: argument checks, model and input preparation;
- ``_report.py``: :class:`BenchRow`, :class:`BenchReport` (table, HTML, JSON);
- ``_plot.py``: :meth:`BenchReport.plot`; ``_format.py``: number formatting.

The progress bar is ``fxindex/_progress.py``, shared with the shape pass.
"""

from __future__ import annotations

from fxindex._bench._bench import MAX_RELATIVE_IQR, bench
from fxindex._bench._memory import CPU_MEMORY_MEASURE, CUDA_MEMORY_MEASURE
from fxindex._bench._report import REPORT_FORMAT, BenchReport, BenchRow
from fxindex._bench._stats import SpeedRatio, median_interval, paired_speed_ratio

__all__ = [
    "CPU_MEMORY_MEASURE",
    "CUDA_MEMORY_MEASURE",
    "MAX_RELATIVE_IQR",
    "REPORT_FORMAT",
    "BenchReport",
    "BenchRow",
    "SpeedRatio",
    "bench",
    "median_interval",
    "paired_speed_ratio",
]
