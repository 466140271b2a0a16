"""The diffusion-purification core: schedule, reverse steps, EPS, SSNI timesteps, gradients, saving and loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dad.io import IncompatibleFileError
from dad.diffusion import (
    DiffusionPurifier,
    DiffusionSchedule,
    ScoreUNet,
    SSNIPurifier,
    ddim_step,
    ddpm_step,
    eps_timesteps,
    expected_perturbation_score,
    load_purifier,
    map_timesteps,
    save_purifier,
)


class _Linear(nn.Module):
    """A toy model whose noise prediction is known: ``eps(x, t) = scale * x + t / 100``."""

    def __init__(self, scale: float = 0.5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.scale * x + t.to(x.dtype).reshape(-1, 1, 1, 1) / 100


class _Marker:
    """Unpickling this creates a file: the proof that a loader executed code from a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.path),))


def _net(seed: int = 0) -> ScoreUNet:
    """A tiny ScoreUNet for 8x8 images whose output layer is not zero (so EPS and t(x) vary)."""
    torch.manual_seed(seed)
    net = ScoreUNet(in_channels=1, widths=(8, 16), blocks_per_level=1)
    nn.init.normal_(net.output[-1].weight, std=0.1)
    return net.eval()


def _images(n: int = 6, seed: int = 1) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# --- schedule ---------------------------------------------------------------------------------------------------

def test_schedule_matches_its_definition() -> None:
    schedule = DiffusionSchedule()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(schedule.betas.double(), betas)
    torch.testing.assert_close(schedule.alphas.double(), 1 - betas)
    torch.testing.assert_close(schedule.alpha_bars.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=1e-7)
    steps = torch.arange(1, 1001)
    torch.testing.assert_close(schedule.alpha_bar(steps), schedule.alpha_bars)  # integer t: the table
    torch.testing.assert_close(schedule.alpha_bar(steps.float()), schedule.alpha_bars, rtol=1e-5, atol=1e-7)
    assert schedule.alpha_bar(torch.tensor(0)).item() == 1.0 and schedule.alpha_bar(torch.tensor(0.0)).item() == 1.0
    assert schedule.state_dict() == {}  # defined by its config, not stored


def test_real_timesteps_interpolate_monotonically_and_differentiably() -> None:
    schedule = DiffusionSchedule(num_steps=50)
    t = torch.linspace(0, 50, 2001, dtype=torch.float64, requires_grad=True)
    ab = schedule.alpha_bar(t)
    assert bool((ab[1:] < ab[:-1]).all())  # strictly decreasing, across integer steps too
    for k in (0, 1, 17, 49):  # between two integers, log alpha_bar is linear
        lo, hi = schedule.alpha_bar(torch.tensor(float(k))), schedule.alpha_bar(torch.tensor(float(k + 1)))
        mid = schedule.alpha_bar(torch.tensor(k + 0.25))
        torch.testing.assert_close(mid.log(), 0.75 * lo.log() + 0.25 * hi.log())
    ab.sum().backward()
    assert t.grad is not None and bool((t.grad[1:-1] < 0).all())  # the clamp to [0, T] stops it at the ends


def test_diffuse_is_the_closed_form() -> None:
    schedule = DiffusionSchedule()
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([1, 250, 1000])
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t - 1].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.diffuse(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    torch.testing.assert_close(schedule.diffuse(x0, torch.zeros(3), noise), x0)
    with pytest.raises(ValueError, match="per-sample timesteps of shape"):
        schedule.diffuse(x0, torch.tensor(5), noise)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_steps": 0}, "num_steps"),
    ({"beta_start": 0.03}, "beta_start"),
])
def test_schedule_rejects_bad_settings(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiffusionSchedule(**kwargs)  # type: ignore[arg-type]


# --- reverse steps ----------------------------------------------------------------------------------------------

def test_ddpm_step_is_the_ancestral_formula() -> None:
    schedule, model = DiffusionSchedule(), _Linear(0.5)
    x_t, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([1, 40, 999])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab_all = torch.cumprod(1 - betas, 0)
    out = ddpm_step(model, schedule, x_t, t, noise)
    for i, step in enumerate(t.tolist()):
        beta, ab = betas[step - 1].item(), ab_all[step - 1].item()
        ab_prev = ab_all[step - 2].item() if step > 1 else 1.0
        eps = 0.5 * x_t[i] + step / 100
        expected = (x_t[i] - beta / (1 - ab) ** 0.5 * eps) / (1 - beta) ** 0.5
        expected = expected + (beta * (1 - ab_prev) / (1 - ab)) ** 0.5 * noise[i]
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)
    # at t = 1 the posterior variance is 0: no noise is added
    torch.testing.assert_close(ddpm_step(model, schedule, x_t[:1], t[:1], noise[:1]),
                               ddpm_step(model, schedule, x_t[:1], t[:1], torch.zeros_like(noise[:1])))


def test_ddim_step_is_the_deterministic_formula() -> None:
    schedule, model = DiffusionSchedule(), _Linear(0.3)
    x_t = torch.randn(2, 1, 4, 4)
    t, t_next = torch.tensor([80.0, 10.5]), torch.tensor([40.0, 0.0])
    out = ddim_step(model, schedule, x_t, t, t_next)
    for i in range(2):
        ab, ab_next = schedule.alpha_bar(t[i]), schedule.alpha_bar(t_next[i])
        eps = 0.3 * x_t[i] + t[i] / 100
        x0 = (x_t[i] - (1 - ab).sqrt() * eps) / ab.sqrt()
        torch.testing.assert_close(out[i], ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps)


# --- EPS and t(x) -----------------------------------------------------------------------------------------------

def test_eps_matches_a_loop_over_its_definition() -> None:
    net, schedule, x = _net(), DiffusionSchedule(), _images()
    assert eps_timesteps().tolist() == [2.0 * k for k in range(1, 11)]
    with torch.no_grad():
        total = torch.zeros_like(x)
        for k in range(1, 11):
            t = torch.full((x.shape[0],), 20.0 * k / 10)
            total += -net(2 * x - 1, t) / (1 - schedule.alpha_bar(t)).sqrt().reshape(-1, 1, 1, 1)
        expected = (total / 10).flatten(1).norm(dim=1)
        torch.testing.assert_close(expected_perturbation_score(net, schedule, x), expected)
        grid = eps_timesteps(4, 8.0)
        total = sum(-net(2 * x - 1, t.expand(6)) / (1 - schedule.alpha_bar(t)).sqrt() for t in grid.float())
        torch.testing.assert_close(expected_perturbation_score(net, schedule, x, grid),
                                   (total / 4).flatten(1).norm(dim=1))


@pytest.mark.parametrize("mapping", ["sigmoid", "linear"])
def test_timesteps_grow_with_the_eps_norm_and_stay_in_range(mapping: str) -> None:
    norms = torch.cat([torch.linspace(-50, 50, 4001), torch.tensor([0.0, 1e6])]).sort().values
    t = map_timesteps(norms, mu=3.0, tau=2.0, t_max=120.0, mapping=mapping)  # type: ignore[arg-type]
    assert bool((t[1:] >= t[:-1]).all()) and bool((t >= 0).all()) and bool((t <= 120).all())
    assert map_timesteps(torch.tensor([3.0]), 3.0, 2.0, 120.0, mapping).item() == pytest.approx(60.0)  # type: ignore
    assert t[-1].item() == pytest.approx(120.0)
    middle = (norms - 3.0).abs() < 2.0  # near the clean mean, t(x) strictly increases
    assert bool((t[middle][1:] > t[middle][:-1]).all())


def test_linear_map_spans_the_range_over_slope_deviations() -> None:
    t = map_timesteps(torch.tensor([-3.0, 0.0, 3.0, 6.0, 9.0]), 3.0, 2.0, 100.0, "linear", slope=3.0)
    torch.testing.assert_close(t, torch.tensor([0.0, 25.0, 50.0, 75.0, 100.0]))


def test_ssni_gives_more_noise_to_images_with_larger_eps() -> None:
    schedule = DiffusionSchedule()
    ssni = SSNIPurifier(DiffusionPurifier(_Linear(1.0), schedule, 50, "ddim", 3), bias=10.0)
    with pytest.raises(RuntimeError, match="calibrate"):
        ssni.timesteps(_images())
    ssni.calibrate(_images(32))
    # eps = x_model + t / 100: a larger |2x - 1| gives a larger EPS norm
    x = torch.stack([torch.full((1, 8, 8), v) for v in (0.5, 0.6, 0.8, 1.0)])
    t = ssni.timesteps(x)
    assert bool((t[1:] > t[:-1]).all()) and bool((t >= 0).all()) and bool((t <= 60).all())
    assert ssni(x).shape == x.shape


# --- purification -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_zero_timestep_leaves_a_sample_unchanged(sampler: str) -> None:
    purifier = DiffusionPurifier(_net(), DiffusionSchedule(), 8, sampler, 3)  # type: ignore[arg-type]
    x = _images(3)
    with torch.no_grad():
        out = purifier.purify(x, torch.tensor([0.0, 4.0, 8.0]))
    torch.testing.assert_close(out[0], x[0])
    assert not torch.allclose(out[1:], x[1:]) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match=r"`t` in \[0, 1000\]"):
        purifier.purify(x, torch.tensor([0.0, 4.0, 1001.0]))


def test_ddpm_steps_each_sample_from_its_own_timestep() -> None:
    calls: list[int] = []

    class _Recording(_Linear):
        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            calls.append(x.shape[0])
            return super().forward(x, t)

    purifier = DiffusionPurifier(_Recording(), DiffusionSchedule(), 5, "ddpm")
    purifier.purify(_images(3), torch.tensor([2.0, 4.6, 1.0]))  # 4.6 rounds to 5
    assert calls == [1, 1, 1, 2, 3]  # steps 5, 4, 3: one sample; step 2: two; step 1: all three


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_gradients_flow_through_purification_with_and_without_checkpointing(sampler: str) -> None:
    net, schedule, x = _net(), DiffusionSchedule(), _images(3)
    grads = []
    for checkpoint in (False, True):
        purifier = DiffusionPurifier(net, schedule, 6, sampler, 3, checkpoint=checkpoint)  # type: ignore[arg-type]
        ssni = SSNIPurifier(purifier, bias=2.0)
        ssni.mu.fill_(0.0)
        ssni.tau.fill_(1.0)
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        ssni(inputs).square().sum().backward()
        assert inputs.grad is not None and bool(torch.isfinite(inputs.grad).all()) and inputs.grad.abs().sum() > 0
        grads.append(inputs.grad)
    torch.testing.assert_close(grads[0], grads[1])  # checkpointing recomputes the same steps and noise


def test_ddim_gradient_reaches_the_timesteps() -> None:
    purifier = DiffusionPurifier(_net(), DiffusionSchedule(), 30, "ddim", 4)
    t = torch.tensor([0.0, 12.5, 30.0], requires_grad=True)
    torch.manual_seed(0)
    purifier.purify(_images(3), t).sum().backward()
    assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and t.grad[1:].abs().min() > 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"t_star": 0}, "t_star"),
    ({"t_star": 1001}, "t_star"),
    ({"sampler": "euler"}, "sampler"),
    ({"ddim_steps": 0}, "ddim_steps"),
])
def test_purifier_rejects_bad_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiffusionPurifier(_Linear(), DiffusionSchedule(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"bias": -100.0}, "t_star"),
    ({"bias": 1000.0}, "t_star"),
    ({"mapping": "step"}, "mapping"),
    ({"slope": 0.0}, "slope"),
    ({"eps_num_timesteps": 0}, "num_timesteps"),
])
def test_ssni_rejects_bad_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SSNIPurifier(DiffusionPurifier(_Linear(), DiffusionSchedule(), 100), **kwargs)  # type: ignore[arg-type]


# --- saving and loading -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "sampler"), [("fixed", "ddpm"), ("ssni", "ddim"), ("ssni", "ddpm")])
def test_a_reloaded_purifier_gives_identical_outputs(tmp_path: Path, kind: str, sampler: str) -> None:
    purifier: DiffusionPurifier | SSNIPurifier = DiffusionPurifier(_net(), DiffusionSchedule(num_steps=200), 12,
                                                                   sampler, 3)  # type: ignore[arg-type]
    if kind == "ssni":
        purifier = SSNIPurifier(purifier, bias=3.0, mapping="linear", slope=2.0, eps_num_timesteps=4,
                                eps_max_timestep=8.0)
        purifier.calibrate(_images(16, seed=5))
    save_purifier(purifier, tmp_path / "purifier.pt")
    loaded = load_purifier(tmp_path / "purifier.pt")
    assert type(loaded) is type(purifier) and not loaded.training
    x = _images()
    outputs = []
    for module in (purifier, loaded):
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(module(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_loading_never_runs_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    raw, zipped = tmp_path / "raw.pt", tmp_path / "zipped.pt"
    raw.write_bytes(pickle.dumps({"format": "dad-purifier", "state_dict": _Marker(str(marker))}))
    torch.save({"format": "dad-purifier", "version": 1, "state_dict": _Marker(str(marker))}, zipped)
    for path in (raw, zipped):
        with pytest.raises(IncompatibleFileError, match="not a loadable purifier") as info:
            load_purifier(path)
        assert "\n" not in str(info.value)
    assert not marker.exists()


def test_foreign_and_corrupted_files_are_refused(tmp_path: Path) -> None:
    save_purifier(DiffusionPurifier(_net(), DiffusionSchedule(), 10), tmp_path / "good.pt")
    good = torch.load(tmp_path / "good.pt", weights_only=True)
    cases = {
        "foreign.pt": ({"state_dict": {}}, "no 'dad-purifier' header"),
        "version.pt": ({**good, "version": 99}, "format version 99"),
        "kind.pt": ({**good, "kind": "other"}, "unknown purifier kind"),
        "weights.pt": ({**good, "state_dict": {}}, "does not describe a purifier"),
    }
    for name, (payload, match) in cases.items():
        torch.save(payload, tmp_path / name)
        with pytest.raises(IncompatibleFileError, match=match):
            load_purifier(tmp_path / name)
    (tmp_path / "corrupt.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    with pytest.raises(IncompatibleFileError, match="not a loadable purifier"):
        load_purifier(tmp_path / "corrupt.pt")
    with pytest.raises(FileNotFoundError):
        load_purifier(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="ScoreUNet"):
        save_purifier(DiffusionPurifier(_Linear(), DiffusionSchedule(), 10), tmp_path / "toy.pt")


# --- the network ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("channels", "widths", "size"), [(1, (8, 16), 8), (3, (8, 16, 16), 32), (3, (8, 16), 7)])
def test_score_unet_shapes_and_rebuild(channels: int, widths: tuple[int, ...], size: int) -> None:
    net = ScoreUNet(in_channels=channels, widths=widths, blocks_per_level=1)
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0.5, 731.25]))
    assert out.shape == x.shape and bool((out == 0).all())  # the output layer starts at zero
    rebuilt = ScoreUNet(**net.config)
    rebuilt.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="per-sample timesteps"):
        net(x, torch.tensor(3.0))
    with pytest.raises(ValueError, match="widths"):
        ScoreUNet(widths=())
