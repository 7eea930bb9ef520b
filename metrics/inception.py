"""The FID Inception-v3: the network every published FID is computed with, and its weight file.

FID (Heusel et al. 2017) is defined on the 2048-d pool features of one particular network: TensorFlow's Inception-v3
graph of 2015-12-05 (`classify_image_graph_def.pb`). pytorch-fid, clean-fid and torch-fidelity all port that graph
to PyTorch; this file is the same port, written out block by block with the module names of pytorch-fid's
`fid_inception_v3()` (torchvision's `Inception3` names), so pytorch-fid's weight file loads by name:

    pt_inception-2015-12-05-6726825d.pth   (pytorch-fid's GitHub releases, "fid_weights"; 1008-class head)

or a .safetensors copy of it (same keys). A .pth is read with torch.load(weights_only=True): a pickle never runs code.

The graph differs from torchvision's ImageNet Inception-v3 in three places, all kept here: the average pools inside
the A, C and first E blocks exclude the zero padding from the mean (TF's 'SAME' avg pool), the last E block pools
its side branch with a max pool instead of an average, and the classifier has 1008 classes.

Input chain (pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`, which we match exactly):
    uint8 RGB image -> float in [0, 1] (x / 255)
    -> bilinear resize to 299×299 (F.interpolate, align_corners=False, no antialias)
    -> 2x − 1 (to [−1, 1])  -> the network -> global average pool -> (B, 2048) features.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, open_weights

WEIGHTS_HELP = ("the FID Inception weights: pt_inception-2015-12-05-6726825d.pth from pytorch-fid's GitHub releases "
                "(tag fid_weights), or a .safetensors copy of it with the same keys")
INPUT_SIZE = 299


@dataclass
class InceptionConfig:
    width_divisor: int = 1   # every channel count is divided by this: 1 is the real network; tests use 8
    num_classes: int = 1008  # the TF graph's head (1000 ImageNet classes + 8 unused); loaded, never used for FID

    @property
    def features(self) -> int:
        """Width of the pool features: 2048 for the real network."""
        return 2048 // self.width_divisor


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm (ε = 0.001, TF's) -> ReLU."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    """3×3 stride-1 average pool whose border means ignore the padding (TF 'SAME' pooling)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """Mixed_5b/c/d (35×35): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg pool→1×1."""

    def __init__(self, c_in, pool_features, d):
        super().__init__()
        self.branch1x1 = BasicConv(c_in, 64 // d, 1)
        self.branch5x5_1 = BasicConv(c_in, 48 // d, 1)
        self.branch5x5_2 = BasicConv(48 // d, 64 // d, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(c_in, 64 // d, 1)
        self.branch3x3dbl_2 = BasicConv(64 // d, 96 // d, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96 // d, 96 // d, 3, padding=1)
        self.branch_pool = BasicConv(c_in, pool_features // d, 1)
        self.c_out = 2 * (64 // d) + 96 // d + pool_features // d

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class BlockB(nn.Module):
    """Mixed_6a (35→17): stride-2 3×3 | 1×1→3×3→stride-2 3×3 | stride-2 max pool."""

    def __init__(self, c_in, d):
        super().__init__()
        self.branch3x3 = BasicConv(c_in, 384 // d, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(c_in, 64 // d, 1)
        self.branch3x3dbl_2 = BasicConv(64 // d, 96 // d, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96 // d, 96 // d, 3, stride=2)
        self.c_out = 384 // d + 96 // d + c_in

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockC(nn.Module):
    """Mixed_6b–e (17×17): 1×1 | 1×1→1×7→7×1 | 1×1→7×1→1×7→7×1→1×7 | avg pool→1×1."""

    def __init__(self, c_in, c7, d):
        super().__init__()
        c7 = c7 // d
        self.branch1x1 = BasicConv(c_in, 192 // d, 1)
        self.branch7x7_1 = BasicConv(c_in, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192 // d, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192 // d, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(c_in, 192 // d, 1)
        self.c_out = 4 * (192 // d)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class BlockD(nn.Module):
    """Mixed_7a (17→8): 1×1→stride-2 3×3 | 1×1→1×7→7×1→stride-2 3×3 | stride-2 max pool."""

    def __init__(self, c_in, d):
        super().__init__()
        self.branch3x3_1 = BasicConv(c_in, 192 // d, 1)
        self.branch3x3_2 = BasicConv(192 // d, 320 // d, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(c_in, 192 // d, 1)
        self.branch7x7x3_2 = BasicConv(192 // d, 192 // d, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192 // d, 192 // d, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192 // d, 192 // d, 3, stride=2)
        self.c_out = 320 // d + 192 // d + c_in

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockE(nn.Module):
    """Mixed_7b/c (8×8): 1×1 | 1×1→(1×3 ‖ 3×1) | 1×1→3×3→(1×3 ‖ 3×1) | pool→1×1. The pool is TF's padding-free
    average in Mixed_7b and a max pool in Mixed_7c (the TF graph's quirk)."""

    def __init__(self, c_in, d, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv(c_in, 320 // d, 1)
        self.branch3x3_1 = BasicConv(c_in, 384 // d, 1)
        self.branch3x3_2a = BasicConv(384 // d, 384 // d, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384 // d, 384 // d, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(c_in, 448 // d, 1)
        self.branch3x3dbl_2 = BasicConv(448 // d, 384 // d, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384 // d, 384 // d, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384 // d, 384 // d, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(c_in, 192 // d, 1)
        self.c_out = 320 // d + 4 * (384 // d) + 192 // d

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> pool features (B, 2048). See the module docstring for the input chain."""

    def __init__(self, cfg: InceptionConfig = InceptionConfig()):
        super().__init__()
        self.config = cfg
        d = cfg.width_divisor
        self.Conv2d_1a_3x3 = BasicConv(3, 32 // d, 3, stride=2)          # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv(32 // d, 32 // d, 3)              # -> 147
        self.Conv2d_2b_3x3 = BasicConv(32 // d, 64 // d, 3, padding=1)   # -> 147, then max pool -> 73
        self.Conv2d_3b_1x1 = BasicConv(64 // d, 80 // d, 1)
        self.Conv2d_4a_3x3 = BasicConv(80 // d, 192 // d, 3)             # -> 71, then max pool -> 35
        self.Mixed_5b = BlockA(192 // d, 32, d)
        self.Mixed_5c = BlockA(self.Mixed_5b.c_out, 64, d)
        self.Mixed_5d = BlockA(self.Mixed_5c.c_out, 64, d)
        self.Mixed_6a = BlockB(self.Mixed_5d.c_out, d)                   # 35 -> 17
        self.Mixed_6b = BlockC(self.Mixed_6a.c_out, 128, d)
        self.Mixed_6c = BlockC(self.Mixed_6b.c_out, 160, d)
        self.Mixed_6d = BlockC(self.Mixed_6c.c_out, 160, d)
        self.Mixed_6e = BlockC(self.Mixed_6d.c_out, 192, d)
        self.Mixed_7a = BlockD(self.Mixed_6e.c_out, d)                   # 17 -> 8
        self.Mixed_7b = BlockE(self.Mixed_7a.c_out, d, max_pool=False)
        self.Mixed_7c = BlockE(self.Mixed_7b.c_out, d, max_pool=True)
        self.fc = nn.Linear(self.Mixed_7c.c_out, cfg.num_classes)        # in the weight file; unused by FID

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 3, H, W) -> the network's input (B, 3, 299, 299) in [−1, 1] (pytorch-fid's chain)."""
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> features (B, F), F = 2048 for the real network."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInception takes RGB images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}.")
        x = self.preprocess(images.float())
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)                    # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                                 # ... -> (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                        # (B, 2048)


def sha256_of(path, chunk=1 << 24) -> str:
    """Hex SHA-256 of a file, read in 16 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_weights(weights, model: FIDInception, path: Path) -> dict:
    """The file's tensors by our names, after checking every name and shape; a clear error otherwise."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    found = [k for k in weights if not k.endswith("num_batches_tracked")]
    if any(k.startswith("AuxLogits.") for k in found) or ("fc.weight" in weights and
                                                          tuple(weights["fc.weight"].shape)[0] == 1000):
        raise CheckpointError(f"{path}: this is torchvision's ImageNet Inception-v3 (auxiliary head / 1000-class "
                              f"fc), not the FID network. FID needs {WEIGHTS_HELP}.")
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(f"{path}: not the FID Inception-v3 ({len(missing)} weight(s) missing, "
                              f"{len(unexpected)} unexpected; first {first}). Pass {WEIGHTS_HELP}.")
    for k, shape in expected.items():
        if tuple(weights[k].shape) != tuple(shape):
            raise CheckpointError(f"{path}: weight {k!r} has shape {tuple(weights[k].shape)}, expected "
                                  f"{tuple(shape)} (width_divisor={model.config.width_divisor}). Pass {WEIGHTS_HELP}.")
    return {k: weights[k] for k in expected}


def load_inception(path, device="cpu", config: InceptionConfig | None = None) -> FIDInception:
    """The FID Inception filled strictly from `path` (see WEIGHTS_HELP), in float32 and eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception {path}: no such file. Pass {WEIGHTS_HELP}.")
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise CheckpointError(f"--inception {path}: expected a .pth or .safetensors file, got {path.suffix!r}. "
                              f"Pass {WEIGHTS_HELP}.")
    model = FIDInception(config or InceptionConfig())
    state = _check_weights(open_weights(path), model, path)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)  # num_batches_tracked: unused
    return model.to(device).eval().requires_grad_(False)
