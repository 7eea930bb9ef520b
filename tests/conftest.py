"""Settings shared by every test (sys.path is set by `pythonpath` in pytest.ini)."""
import pytest
import torch

from tiny_models import write_tiny_sd15

torch.set_num_threads(1)  # tiny models: more threads only add contention on a 2-core machine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny SD1.5-shaped model folder (tiny_models.write_tiny_sd15), one per test module."""
    root = tmp_path_factory.mktemp("sd15")
    write_tiny_sd15(root)
    return root
