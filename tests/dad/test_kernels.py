"""The MMD-OPT kernel module: initialisation, training signal, state dict, frozen features."""

import math

import pytest
import torch
from torch import nn

from dad.kernels import SemanticKernel, semantic_gram
from dad.mmd import mmd2_unbiased, pairwise_sq_dists


class _Constant(nn.Module):
    """A feature extractor with no information: the kernel reduces to a Gaussian on the inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 1, dtype=x.dtype)


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x.flatten(1)))


def _easy_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 1, 2, 2, generator=g), torch.randn(40, 1, 2, 2, generator=g) + 0.8


def _jitter_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary points vs the same kind of points with small noise: only a small bandwidth tells them apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (60, 1, 2, 2), generator=g).float()
    y = torch.randint(0, 2, (60, 1, 2, 2), generator=g).float() + 0.15 * torch.randn(60, 1, 2, 2, generator=g)
    return x, y


@pytest.mark.parametrize(
    "make_pair, start, direction",
    [(_jitter_pair, 0.3, -1), (_easy_pair, 0.3, +1)],
    ids=["fine-structure-shrinks", "mean-shift-grows"],
)
def test_raising_j_moves_the_bandwidth_as_expected(make_pair, start, direction):
    x, y = make_pair()
    kernel = SemanticKernel(_Constant(), sigma_q=start)
    opt = torch.optim.Adam(kernel.parameters(), lr=0.1)
    j0 = kernel.j_statistic(x, y).item()
    for _ in range(60):
        opt.zero_grad()
        (-kernel.j_statistic(x, y)).backward()
        opt.step()
    j1 = kernel.j_statistic(x, y).item()
    assert j1 > j0 + 0.1
    moved = math.log(kernel.sigma_q.item()) - math.log(start)
    assert moved * direction > 1.0  # at least a factor e in the expected direction


def test_j_gradient_is_finite_for_all_parameters():
    x, y = _easy_pair(1)
    kernel = SemanticKernel(_TinyNet(), train_features=True)
    kernel.init_bandwidths(x, y)
    kernel.j_statistic(x, y).backward()
    grads = [p.grad for p in kernel.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_init_bandwidths_follows_the_paper():
    x, y = torch.rand(6, 3, 5, 7), torch.rand(6, 3, 5, 7)
    net = _TinyNet()
    net.lin = nn.Linear(105, 3)
    kernel = SemanticKernel(net)
    kernel.init_bandwidths(x, y)
    feats = net.forward_features(torch.cat([x, y]))
    expected = pairwise_sq_dists(feats[:6], feats[6:]).median().item()
    assert kernel.sigma_phi.item() == pytest.approx(expected, rel=1e-5)
    assert kernel.sigma_q.item() == pytest.approx(2 * 5 * 7, rel=1e-5)
    assert kernel.eps.item() == pytest.approx(1e-10, rel=1e-3)
    assert bool(kernel.initialized)


def test_gram_matches_functional_form():
    x, y = torch.rand(5, 1, 2, 2, dtype=torch.float64), torch.rand(4, 1, 2, 2, dtype=torch.float64)
    net = _TinyNet().double().eval()
    kernel = SemanticKernel(net, sigma_phi=3.0, sigma_q=2.0, eps=0.2).double()
    kxx, kyy, kxy = kernel.gram(x, y)
    fx, fy = net.forward_features(x), net.forward_features(y)
    torch.testing.assert_close(kxy, semantic_gram(fx, fy, x, y, 3.0, 2.0, 0.2).float())
    assert kxx.shape == (5, 5) and kyy.shape == (4, 4)


def test_state_dict_round_trip():
    x, y = _easy_pair(2)
    a = SemanticKernel(_TinyNet())
    a.init_bandwidths(x, y)
    with torch.no_grad():
        a.eps_logit.fill_(-1.0)
    b = SemanticKernel(_TinyNet())
    b.load_state_dict(a.state_dict())
    assert bool(b.initialized)
    for name in ("eps", "sigma_phi", "sigma_q"):
        assert getattr(a, name).item() == getattr(b, name).item()
    assert a.mmd2(x, y).item() == b.mmd2(x, y).item()


def test_frozen_features_stay_frozen():
    net = _TinyNet()
    kernel = SemanticKernel(net)
    kernel.train()
    assert not net.training and not net.bn.training
    assert all(not p.requires_grad for p in net.parameters())
    stats = net.bn.running_mean.clone()
    x, y = torch.rand(8, 4), torch.rand(8, 4) + 1
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(kernel.mmd2(x, y, "biased"), x)
    assert grad.abs().sum() > 0  # gradients reach the inputs through the frozen phi
    torch.testing.assert_close(net.bn.running_mean, stats)
    trainable = SemanticKernel(_TinyNet(), train_features=True).train()
    assert trainable.phi.training


def test_invalid_arguments():
    with pytest.raises(ValueError, match="sigma_q"):
        SemanticKernel(_Constant(), sigma_q=0.0)
    with pytest.raises(ValueError, match="eps"):
        SemanticKernel(_Constant(), eps=1.0)
    with pytest.raises(ValueError, match="estimator"):
        SemanticKernel(_Constant()).mmd2(torch.rand(3, 2), torch.rand(3, 2), "nope")


def test_unbiased_mmd_of_kernel_uses_paired_estimator():
    x, y = _easy_pair(3)
    kernel = SemanticKernel(_Constant(), sigma_q=2.0)
    assert kernel.mmd2(x, y).item() == pytest.approx(mmd2_unbiased(*kernel.gram(x, y)).item())


def test_statistics_stay_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.rand(16, 1, 8, 8, generator=g) + 0.01
    kernel = SemanticKernel(_Constant(), sigma_q=20.0)
    reference = kernel.gram(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grams = kernel.gram(x, y)
    for got, want in zip(grams, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # bf16 distances would be off by ~1e-2
