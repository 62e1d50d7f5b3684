"""Downstream tests train tiny models on tiny graphs: one torch thread each.

With two threads on a shared 2-core machine the threads mostly wait on each other; one thread
ran the fine-tuning tests 15x faster under load.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
