"""Shared pytest fixtures for the fxindex test suite.

Keep this file small: only fixtures that several test files use belong here.
Add new fixtures below with a one-line docstring each.

Fixtures:
    seed_model   -- fxindex.examples.SeedModel, seeded and in eval mode.
    seed_inputs  -- its example inputs, a tuple with one (2, 3, 28, 28) tensor.
    _release_memory_after_each_test -- (autouse) gives freed heap memory back to the OS.
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
    config.addinivalue_line("markers", "slow: takes seconds on its own (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _release_memory_after_each_test():
    """The zoo tests build models of up to 645M parameters: trim the heap after each test."""
    yield
    import zoo  # a helper module beside this file

    zoo.release_memory()
