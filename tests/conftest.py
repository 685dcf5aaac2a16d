import os
import sys

import torch

# Tests are small: one thread keeps the 2-core CI machine from oversubscribing when ranks spawn.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import test modules by name

import pytest  # noqa: E402

# The config files of the released Wan checkpoints as a Hugging Face cache (no weights): the repo ids
# of configs/*.yaml resolve here for the memory plan and the dry run.
FIXTURE_HUB = os.path.join(os.path.dirname(__file__), "fixtures", "hub")


@pytest.fixture
def real_configs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", FIXTURE_HUB)
    return FIXTURE_HUB
