"""Tests import the top-level modules (unet.py, sd15.py, ...) and the helpers beside them (tiny_models.py)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

torch.set_num_threads(1)  # tiny models: more threads only add contention on a 2-core machine
