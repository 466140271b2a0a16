"""Tests for the U-Net denoiser: any input size, near-identity start, gradients, rebuild from config."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from dad.denoisers import UNetDenoiser

TINY = {"enc_widths": (8, 16, 16), "enc_depths": (1, 1, 1), "dec_widths": (16, 8), "dec_depths": (1, 1)}
SMALL = {
    "enc_widths": (16, 32, 32, 32, 32),
    "enc_depths": (1, 1, 1, 1, 1),
    "dec_widths": (32, 32, 32, 16),
    "dec_depths": (1, 1, 1, 1),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Run on one thread: on a shared 2-core machine, two threads per process stall badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("shape", "config"),
    [
        ((2, 1, 8, 8), SMALL),  # five stages on 8x8: the deepest ones are 1x1
        ((2, 3, 32, 32), SMALL),
        ((2, 3, 31, 33), SMALL),  # odd sizes: every upsample matches its skip exactly
        ((1, 3, 224, 224), TINY),
        ((2, 1, 1, 1), TINY),
    ],
)
def test_output_shape_and_finite(shape: tuple[int, ...], config: dict) -> None:
    torch.manual_seed(0)
    denoiser = UNetDenoiser(in_channels=shape[1], **config)
    x = _images(*shape)
    out = denoiser(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_default_is_the_hgd_configuration() -> None:
    denoiser = UNetDenoiser()
    convs = [[m.out_channels for m in stage.modules() if isinstance(m, nn.Conv2d)] for stage in denoiser.encoder]
    assert convs == [[64] * 2, [128] * 3, [256] * 3, [256] * 3, [256] * 3]
    decoder = [[m.out_channels for m in stage.modules() if isinstance(m, nn.Conv2d)] for stage in denoiser.decoder]
    assert decoder == [[256] * 3, [256] * 3, [128] * 3, [64] * 2]
    assert denoiser.decoder[0][0][0].in_channels == 256 + 256  # deepest output + the 4th stage's skip
    assert denoiser.decoder[-1][0][0].in_channels == 128 + 64  # previous decoder stage + the first skip
    assert (denoiser.output.kernel_size, denoiser.output.out_channels) == ((1, 1), 3)
    out = denoiser.eval()(_images(1, 3, 16, 16))
    assert out.shape == (1, 3, 16, 16)


def test_resolution_halves_per_encoder_stage() -> None:
    denoiser = UNetDenoiser(in_channels=3, **SMALL)
    sizes = []
    out = _images(1, 3, 31, 33)
    for stage in denoiser.encoder:
        out = stage(out)
        sizes.append(tuple(out.shape[-2:]))
    assert sizes == [(31, 33), (16, 17), (8, 9), (4, 5), (2, 3)]


@pytest.mark.parametrize("train_mode", [True, False])
def test_near_identity_at_init(train_mode: bool) -> None:
    torch.manual_seed(0)
    denoiser = UNetDenoiser(in_channels=3, **SMALL).train(train_mode)
    x = _images(2, 3, 32, 32)
    residual = denoiser(x) - x
    assert residual.abs().max() < 0.05
    assert residual.abs().max() > 0  # near, not exactly, the identity: the residual path trains from step one
    torch.testing.assert_close(denoiser.residual(x), residual, atol=1e-6, rtol=0)


def test_no_clamp() -> None:
    denoiser = UNetDenoiser(in_channels=1, **TINY).eval()
    x = torch.full((1, 1, 8, 8), 2.0)
    assert denoiser(x).min() > 1.5


def test_gradients_reach_input_and_every_parameter() -> None:
    torch.manual_seed(0)
    denoiser = UNetDenoiser(in_channels=3, **TINY)
    x = _images(2, 3, 16, 16).requires_grad_(True)
    weights = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    (denoiser.residual(x) * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in denoiser.parameters())


def test_rebuild_from_config_and_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    denoiser = UNetDenoiser(in_channels=3, **SMALL)
    with torch.no_grad():
        denoiser.output.weight.normal_()  # a visibly non-identity denoiser
    denoiser(_images(4, 3, 16, 16))  # update the batch-norm running statistics once
    path = tmp_path / "denoiser.pt"
    torch.save({"config": denoiser.config, "state_dict": denoiser.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    rebuilt = UNetDenoiser(**saved["config"])
    rebuilt.load_state_dict(saved["state_dict"])
    x = _images(2, 3, 20, 20)
    torch.testing.assert_close(rebuilt.eval()(x), denoiser.eval()(x), rtol=0, atol=0)
    assert denoiser.config == {
        "in_channels": 3,
        "enc_widths": [16, 32, 32, 32, 32],
        "enc_depths": [1, 1, 1, 1, 1],
        "dec_widths": [32, 32, 32, 16],
        "dec_depths": [1, 1, 1, 1],
        "batch_norm": True,
    }


def test_wrong_input_raises() -> None:
    denoiser = UNetDenoiser(in_channels=3, **TINY)
    with pytest.raises(ValueError, match=r"Expected input of shape \(B, 3, H, W\), got \(2, 1, 8, 8\)"):
        denoiser(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"got \(3, 8, 8\)"):
        denoiser(torch.rand(3, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 0}, r"Expected `in_channels` to be a positive int, got 0"),
        ({"enc_widths": (8, 0, 16)}, r"Expected `enc_widths` to be a non-empty sequence of positive ints"),
        ({"enc_depths": (1, 1)}, r"Expected `enc_widths` and `enc_depths` of the same length >= 2"),
        ({"dec_widths": (16,), "dec_depths": (1,)}, r"Expected `dec_widths` and `dec_depths` with 2 entries"),
        ({"dec_depths": (1, 1, 1)}, r"Expected `dec_widths` and `dec_depths` with 2 entries"),
    ],
)
def test_invalid_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNetDenoiser(**{**TINY, **kwargs})


def test_without_batch_norm_has_no_norm_layers_and_works():
    denoiser = UNetDenoiser(in_channels=1, enc_widths=[4, 8], enc_depths=[1, 1], dec_widths=[4], dec_depths=[1],
                            batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in denoiser.modules())
    x = _images(2, 1, 8, 8)
    assert denoiser(x).shape == x.shape
    assert UNetDenoiser(**denoiser.config).config["batch_norm"] is False
