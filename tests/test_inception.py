"""The FID Inception port equals pytorch-fid's InceptionV3 on the same (random) weights, loads only the FID
network's weight file, and says which file is wrong and why."""
import pytest
import torch
from safetensors.torch import save_file

from checkpoint import CheckpointError
from fid_oracle import random_fid_inception
from metrics.inception import FIDInception, InceptionConfig, load_inception


@pytest.fixture(scope="module")
def oracle():
    return random_fid_inception(seed=0)  # (pytorch-fid's InceptionV3([3]), its Inception3 state dict)


def _images(n, h, w, seed=0):
    """uint8-quantised RGB images in [0, 1], as read from PNG files."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_features_equal_pytorch_fid(oracle, tmp_path, suffix):
    reference, state = oracle
    path = tmp_path / f"pt_inception{suffix}"
    if suffix == ".pth":
        torch.save(state, path)  # pytorch-fid's file layout: a plain state dict (read back weights_only)
    else:  # a safetensors copy, without the unused BatchNorm counters
        save_file({k: v.contiguous() for k, v in state.items() if "num_batches" not in k}, str(path))
    ours = load_inception(path)
    images = _images(2, 96, 128)  # not square, not 299: the bilinear resize is part of what is compared
    with torch.no_grad():
        expected = reference(images)[0].flatten(1)  # (2, 2048)
        got = ours(images)
    assert got.shape == (2, 2048)
    assert expected.abs().max() > 1.0  # the random net is not dead: the comparison means something
    assert (got - expected).norm() / expected.norm() < 1e-4


def test_narrow_config_has_the_same_structure():
    net = FIDInception(InceptionConfig(width_divisor=8)).eval()
    with torch.no_grad():
        out = net(_images(3, 40, 40))
    assert out.shape == (3, 256)
    full = FIDInception().state_dict()
    assert set(net.state_dict()) == set(full)  # same module names: one loader for both


def test_wrong_networks_are_refused_by_name(tmp_path):
    state = FIDInception().state_dict()
    imagenet = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1000, 768),
                              "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(imagenet, tmp_path / "inception_v3_google.pth")
    with pytest.raises(CheckpointError, match="torchvision's ImageNet Inception"):
        load_inception(tmp_path / "inception_v3_google.pth")
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="not the FID Inception-v3.*missing 'Conv2d_1a_3x3"):
        load_inception(tmp_path / "unet.safetensors")
    narrow = {k: v for k, v in FIDInception(InceptionConfig(width_divisor=8)).state_dict().items()}
    torch.save(narrow, tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match="has shape"):
        load_inception(tmp_path / "narrow.pth")  # the full network's config, a narrow file
    with pytest.raises(FileNotFoundError, match="--inception .*pt_inception-2015-12-05"):
        load_inception(tmp_path / "absent.pth")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a .pth or .safetensors"):
        load_inception(tmp_path / "weights.npz")
