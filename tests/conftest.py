import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # shared test helpers (hard_cases.py)
torch.set_num_threads(1)  # small test models: one thread avoids oversubscription on shared runners


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
