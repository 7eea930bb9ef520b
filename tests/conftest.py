"""Settings shared by every test (sys.path is set by `pythonpath` in pytest.ini)."""
import torch

torch.set_num_threads(1)  # tiny models: more threads only add contention on a 2-core machine
