import os
import sys

import torch

# Tests are small: one thread keeps the 2-core CI machine from oversubscribing when ranks spawn.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import test modules by name
