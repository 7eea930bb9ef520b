"""pytorch-fid as a test oracle, built offline: its FID Inception with our random weights, its Fréchet distance.

pytorch-fid imports torchvision for the Inception block classes it patches. PyPI's Linux torchvision wheels are
CUDA builds: beside a CPU torch their compiled ops fail to load in `torchvision/__init__.py`, and an installed
broken torchvision also breaks transformers' CLIP image processor, so requirements-dev.txt cannot list either
(pytorch-fid pulls torchvision). torchvision's model code is plain Python, so this file imports its submodules
without that __init__, from an installed torchvision or from the folder named by $TORCHVISION_SRC (a folder holding
`torchvision/`, e.g. an unzipped torchvision wheel). Without either, the pytorch-fid tests are skipped.
"""
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest


def _import_torchvision():
    """torchvision, or a package stub over its files when its compiled part cannot load."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - any failure of the compiled ops: fall back to the pure-Python modules
        pass
    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[name]
    source = os.environ.get("TORCHVISION_SRC", "")
    spec = importlib.util.find_spec("torchvision")
    folders = [os.path.join(source, "torchvision")] if source else list(spec.submodule_search_locations or []) \
        if spec else []
    if not folders or not os.path.isdir(folders[0]):
        pytest.skip("pytorch-fid oracle: torchvision's Python files are not available (install pytorch-fid and "
                    "torchvision, or set TORCHVISION_SRC to a folder holding an unzipped torchvision wheel)")
    stub = types.ModuleType("torchvision")
    stub.__path__ = folders
    stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)  # find_spec() asks
    stub.__spec__.submodule_search_locations = folders
    stub.__version__ = "0.99"  # pytorch-fid reads it to pick the `weights=` API of torchvision >= 0.13
    sys.modules["torchvision"] = stub


def pytorch_fid():
    """(pytorch_fid.inception, pytorch_fid.fid_score), skipping the test if pytorch-fid is not installed."""
    pytest.importorskip("pytorch_fid", reason="pytorch-fid is not installed (pip install --no-deps pytorch-fid)")
    _import_torchvision()
    import pytorch_fid.fid_score as fid_score
    import pytorch_fid.inception as inception
    return inception, fid_score


def random_fid_inception(seed=0):
    """pytorch-fid's `InceptionV3([3])` (the pool3 features, its default) with random weights and random BatchNorm
    statistics, built without its weight download; returns (model, state dict of its Inception3 names)."""
    import torch
    inception, _ = pytorch_fid()
    real = inception.load_state_dict_from_url
    captured = {}

    def fake_download(url, progress=True):  # fid_inception_v3 loads what this returns: our random weights
        return captured["net"].state_dict()
    inception.load_state_dict_from_url = fake_download
    torch.manual_seed(seed)
    try:
        net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = inception.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = inception.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = inception.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = inception.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = inception.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = inception.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = inception.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = inception.FIDInceptionE_1(1280)
        net.Mixed_7c = inception.FIDInceptionE_2(2048)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, t in net.state_dict().items():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif name.endswith("running_mean") or name.endswith("bn.bias"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
                elif name.endswith("bn.weight"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif t.is_floating_point():  # conv and fc: He-style scale so activations stay O(1)
                    fan_in = t[0].numel() if t.ndim > 1 else 1
                    t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        captured["net"] = net
        model = inception.InceptionV3([3])  # calls fid_inception_v3(), which "downloads" net's weights
    finally:
        inception.load_state_dict_from_url = real
    return model.eval(), {k: v.clone() for k, v in net.state_dict().items()}
