"""Fixtures shared by the evaluation tests: one torch thread, the tiny tokenizer and model.

Test modules import them (``from tests.eval_fixtures import model, one_thread, tok``).
"""

from __future__ import annotations

import pytest
import torch

from peqa_cli.eval.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are dispatch-bound; on a shared 2-core box extra threads only add waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()
