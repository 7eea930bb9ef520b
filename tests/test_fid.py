"""Fréchet distance and density / coverage: equal to the reference implementations, exact on rank-deficient
covariances, zero on identical sets, larger when the sets move apart."""
import numpy as np
import pytest
import torch

from metrics.fid import GaussianStats, density_coverage, feature_stats, frechet_distance


def _sets(n=300, m=250, f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, f, generator=g, dtype=torch.float64) @ torch.randn(f, f, generator=g, dtype=torch.float64)
    b = torch.randn(m, f, generator=g, dtype=torch.float64) @ torch.randn(f, f, generator=g, dtype=torch.float64)
    return a, b + 0.3


def _rank_deficient(n, f, rank, seed):
    """n samples in f dimensions that span only `rank` of them: a singular covariance (as with N < 2048)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, f, generator=g,
                                                                               dtype=torch.float64)


def _textbook(a: np.ndarray, b: np.ndarray) -> float:
    """Tr(Σ₁Σ₂)^½ from the (real) eigenvalues of the non-symmetric product, in numpy."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(ca @ cb).real.clip(min=0)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(eig).sum())


def _pytorch_fid_distance(a, b):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm), or a skip where pytorch-fid cannot be imported."""
    from fid_oracle import pytorch_fid
    _, fid_score = pytorch_fid()
    return fid_score.calculate_frechet_distance(a.mean(0).numpy(), np.cov(a.numpy(), rowvar=False),
                                                b.mean(0).numpy(), np.cov(b.numpy(), rowvar=False))


def test_stats_are_numpy_mean_and_covariance():
    a, _ = _sets()
    s = feature_stats(a.float())
    assert s.n == 300 and s.mu.dtype == torch.float64
    np.testing.assert_allclose(s.mu.numpy(), a.float().double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma.numpy(), np.cov(a.float().double().numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(torch.zeros(1, 4))


@pytest.mark.parametrize("deficient", [False, True])
def test_equals_torchmetrics_and_the_textbook_formula(deficient):
    a, b = _sets() if not deficient else (_rank_deficient(40, 64, 10, 1), _rank_deficient(50, 64, 12, 2) + 0.1)
    ours = frechet_distance(feature_stats(a), feature_stats(b))
    assert ours == pytest.approx(_textbook(a.numpy(), b.numpy()), rel=1e-7)
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    sa, sb = feature_stats(a), feature_stats(b)
    assert ours == pytest.approx(fid_module._compute_fid(sa.mu, sa.sigma, sb.mu, sb.sigma).item(), rel=1e-6)


@pytest.mark.parametrize("deficient", [False, True])
def test_equals_pytorch_fid(deficient):
    a, b = _sets() if not deficient else (_rank_deficient(40, 64, 10, 1), _rank_deficient(50, 64, 12, 2) + 0.1)
    expected = _pytorch_fid_distance(a, b)
    assert frechet_distance(feature_stats(a), feature_stats(b)) == pytest.approx(expected, rel=1e-5)


def test_zero_on_itself_and_growing_with_a_shift():
    for a in (_sets()[0], _rank_deficient(30, 64, 8, 3)):  # full rank and singular
        s = feature_stats(a)
        scale = s.sigma.trace().item()
        assert frechet_distance(s, s) <= 1e-9 * scale
        d = torch.zeros(a.shape[1], dtype=torch.float64)
        d[0] = 2.0
        shifted = feature_stats(a + d)
        assert frechet_distance(s, shifted) == pytest.approx(4.0, rel=1e-6)  # a pure shift adds ‖d‖²
        assert frechet_distance(s, feature_stats(a + 2 * d)) > frechet_distance(s, shifted)
        wider = feature_stats(a * 1.5)
        assert frechet_distance(s, wider) > 1e-3 * scale  # same mean, other spread: also a distance


def test_sizes_must_match():
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(GaussianStats(torch.zeros(3), torch.eye(3), 5), GaussianStats(torch.zeros(4), torch.eye(4), 5))


def _density_coverage_loops(real, fake, k):
    """Naeem et al.'s definitions, written as plain loops over points."""
    real, fake = real.numpy(), fake.numpy()
    dist = lambda x, y: float(np.sqrt(((x - y) ** 2).sum()))  # noqa: E731
    radius = [sorted(dist(x, y) for y in real)[k] for x in real]  # index k: the zero self-distance is index 0
    hits = [[dist(y, x) < radius[i] for i, x in enumerate(real)] for y in fake]
    density = sum(sum(row) for row in hits) / (k * len(fake))
    coverage = sum(any(hits[j][i] for j in range(len(fake))) for i in range(len(real))) / len(real)
    return density, coverage


def test_density_coverage_match_the_definitions():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 3, generator=g)
    for fake in (torch.randn(30, 3, generator=g), torch.randn(30, 3, generator=g) * 0.3 + 1.0):
        got = density_coverage(real, fake, k=3, chunk=7)  # small chunks: the chunked loops are exercised
        density, coverage = _density_coverage_loops(real, fake, 3)
        assert got["density"] == pytest.approx(density) and got["coverage"] == pytest.approx(coverage)
    same = density_coverage(real, real.clone(), k=3)
    far = density_coverage(real, real + 100.0, k=3)
    assert same["coverage"] == 1.0 and far == {"density": 0.0, "coverage": 0.0}
