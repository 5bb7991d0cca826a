"""Shared pytest fixtures for the fxindex test suite.

Keep this file small: only fixtures that several test files use belong here.
Add new fixtures below with a one-line docstring each.

Fixtures:
    seed_model   -- fxindex.examples.SeedModel, seeded and in eval mode.
    seed_inputs  -- its example inputs, a tuple with one (2, 3, 28, 28) tensor.
    user_module  -- writes importable modules into a fresh current directory (the CLI tests' factories).

Hooks:
    pytest_xdist_auto_num_workers -- how many pytest-xdist workers ``-n auto``
        (in pyproject's addopts) starts: 2 for the whole suite, none for a run
        that names its tests.

The zoo tests release memory after each model with fixtures of their own
(tests/test_zoo_*.py); no fixture here runs after every test, because a full
gc.collect() costs 0.1-0.5 s and there are over a thousand tests.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fxindex

# Helper modules that live next to the tests (tests/zoo.py) are importable as
# plain modules (``import zoo``) whatever pytest's import mode.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture
def seed_model() -> fxindex.examples.SeedModel:
    """The SeedModel from fxindex.examples, with seeded weights, in eval mode."""
    torch.manual_seed(0)
    return fxindex.examples.SeedModel().eval()


@pytest.fixture
def seed_inputs() -> tuple[torch.Tensor]:
    """Seeded example inputs for SeedModel: one batch of two 3x28x28 images."""
    torch.manual_seed(1)
    return fxindex.examples.seed_inputs(batch_size=2)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``slow`` marker; in a pytest-xdist worker, share the CPUs out among the workers."""
    config.addinivalue_line("markers", "slow: takes seconds on its own (deselect with -m 'not slow')")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        # Each worker's torch would start one intra-op thread per CPU: two workers on two
        # cores then spin-wait on each other's threads, and the zoo sweep ran 5-10x slower.
        torch.set_num_threads(max(1, _cpu_count() // workers))


def _cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# At most this many workers: each may hold a zoo model of up to 645M parameters
# (a peak of ~5 GB), and CI's machine has 2 cores and 24 GB.
MAX_WORKERS = 2


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error where it is missing
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """The number of workers ``-n auto`` starts (pyproject's addopts passes it).

    The whole suite (``python -m pytest -q``, tests taken from ``testpaths``)
    runs on ``min(2, CPUs)`` workers: CI's machine is its own, and two workers
    nearly halve its wall time. A run that names files, directories or node ids
    (``pytest tests/test_index.py``) stays in one process, as a developer on a
    shared machine expects. ``-n N`` on the command line or the environment
    variable ``PYTEST_XDIST_AUTO_NUM_WORKERS=N`` chooses for any run
    (0: no workers).

    Args:
        config: the pytest configuration, with its arguments parsed.

    Returns:
        The number of workers; 0 runs the tests in this process (also on one CPU,
        where a worker would only add its start-up time).
    """
    chosen = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if chosen:
        return int(chosen)
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return 0
    cpus = _cpu_count()
    return min(MAX_WORKERS, cpus) if cpus > 1 else 0


@pytest.fixture
def user_module(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Write modules into a fresh current directory (importable, as ``python -m`` makes it); return the writer."""
    import textwrap

    monkeypatch.chdir(tmp_path)
    written: list[str] = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)
