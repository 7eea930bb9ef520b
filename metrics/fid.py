"""Distribution metrics in Inception feature space: Fréchet distance (FID), and density / coverage.

FID (Heusel et al. 2017, eq. 6) between Gaussians N(μ₁, Σ₁), N(μ₂, Σ₂) fitted to two feature sets:

    FID = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁ Σ₂)^½

Tr (Σ₁Σ₂)^½ is the sum of the square roots of the eigenvalues of Σ₁Σ₂. That product is not symmetric, so instead of
a general matrix square root (scipy's sqrtm, which can return complex parts and fails on singular inputs) we use
that Σ₁Σ₂ has the same eigenvalues as the symmetric PSD matrix √Σ₁ Σ₂ √Σ₁: two symmetric eigen-decompositions in
float64, round-off-sized eigenvalues set to 0. This is exact for singular (rank-deficient) covariances too,
which is the usual case when there are fewer samples than the 2048 feature dimensions.

Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models"), with k
nearest neighbours in the real features:
    density  = 1/(kM) Σ_j Σ_i 1[Y_j ∈ B(X_i, NND_k(X_i))]   (how many real neighbourhoods a fake lands in; ≈ 1)
    coverage = 1/N Σ_i 1[∃ j: Y_j ∈ B(X_i, NND_k(X_i))]      (fraction of real neighbourhoods holding a fake)
"""
from dataclasses import dataclass

import torch


@dataclass
class GaussianStats:
    """Mean (F,) and covariance (F, F) of a feature set, float64, with its sample count."""
    mu: torch.Tensor
    sigma: torch.Tensor
    n: int


def feature_stats(features: torch.Tensor) -> GaussianStats:
    """Features (N, F) -> their mean and unbiased covariance (N − 1 denominator, as numpy.cov / pytorch-fid)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_stats needs a (N >= 2, F) feature matrix, got shape {tuple(features.shape)}.")
    x = features.double()
    return GaussianStats(mu=x.mean(0), sigma=torch.cov(x.T), n=x.shape[0])


def _psd_eigenvalues_root(values: torch.Tensor) -> torch.Tensor:
    """√ of a PSD matrix's eigenvalues, with those at round-off level (below F·ε·λ_max, negative ones included)
    set to exactly 0: √ is steep at 0, so 1e-16-sized noise on the zero eigenvalues of a singular covariance would
    otherwise add up to a visible error."""
    floor = values.shape[0] * torch.finfo(values.dtype).eps * values.abs().max()
    return torch.where(values > floor, values, torch.zeros_like(values)).sqrt()


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * _psd_eigenvalues_root(values)) @ vectors.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """FID between two fitted Gaussians, in float64 (see the module docstring for the method)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"frechet_distance: feature sizes differ ({a.mu.shape[0]} vs {b.mu.shape[0]}); the two sets "
                         f"were made with different Inception networks.")
    mu_a, mu_b, sig_a, sig_b = a.mu.double(), b.mu.double(), a.sigma.double(), b.sigma.double()
    root_a = _sqrt_psd(sig_a)
    middle = root_a @ sig_b @ root_a                                   # symmetric PSD, eigenvalues of Σ₁Σ₂
    trace_sqrt = _psd_eigenvalues_root(torch.linalg.eigvalsh((middle + middle.T) / 2)).sum()
    fid = (mu_a - mu_b).square().sum() + sig_a.trace() + sig_b.trace() - 2 * trace_sqrt
    return max(fid.item(), 0.0)  # a true distance; round-off can only push an exact 0 slightly negative


def _kth_neighbour_radius(real: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N,) distance of each real feature to its k-th nearest other real feature, computed in row chunks."""
    radii = []
    for rows in real.split(chunk):
        d = torch.cdist(rows, real)                                    # (chunk, N); the point itself is at 0
        radii.append(d.kthvalue(k + 1, dim=1).values)                  # k + 1: skip the zero self-distance
    return torch.cat(radii)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5, chunk: int = 1024) -> dict:
    """Naeem et al. 2020 density and coverage of fake features (M, F) against real features (N, F)."""
    if real.shape[0] <= k:
        raise ValueError(f"density_coverage needs more than k={k} real samples, got {real.shape[0]}.")
    real, fake = real.double(), fake.double()
    radius = _kth_neighbour_radius(real, k, chunk)                     # (N,)
    inside_count = torch.zeros(real.shape[0], dtype=torch.float64)     # per real point: fakes in its ball
    for rows in fake.split(chunk):
        inside = torch.cdist(rows, real) < radius[None]                # (chunk, N)
        inside_count += inside.sum(0)
    return {"density": (inside_count.sum() / (k * fake.shape[0])).item(),
            "coverage": (inside_count > 0).double().mean().item()}
