"""Tests for the classifier zoo: every registered model, the factory, weights loading, freezing."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torchvision.models import resnet50 as tv_resnet50

from dad.models import (
    ImageClassifier,
    create_model,
    freeze,
    list_models,
    load_classifier_weights,
    register_model,
    registry,
)

# name -> (in_channels, spatial size, batch, num_features, num_classes); the big models get small inputs.
MODEL_SPECS: dict[str, tuple[int, int, int, int, int]] = {
    "small_cnn": (1, 8, 2, 128, 10),
    "cifar_resnet18_small": (3, 32, 2, 64, 10),
    "resnet18_cifar": (3, 32, 2, 512, 10),
    "wrn28_10": (3, 32, 2, 640, 10),
    "wrn70_16": (3, 16, 1, 1024, 10),
    "resnet50": (3, 32, 1, 2048, 1000),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Run on one thread: on a shared 2-core machine, two threads per process stall badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(MODEL_SPECS))
def built(request: pytest.FixtureRequest) -> tuple[str, ImageClassifier]:
    """Each registered model, built once (eval mode, seeded) for all tests that use it."""
    torch.manual_seed(0)
    return request.param, create_model(request.param).eval()


def _input(name: str) -> torch.Tensor:
    channels, size, batch, _, _ = MODEL_SPECS[name]
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def test_every_registered_model_is_tested() -> None:
    assert list_models() == sorted(MODEL_SPECS)


def test_model_shapes_and_attributes(built: tuple[str, ImageClassifier]) -> None:
    name, model = built
    channels, _, batch, num_features, num_classes = MODEL_SPECS[name]
    assert (model.in_channels, model.num_features, model.num_classes) == (channels, num_features, num_classes)
    x = _input(name)
    with torch.no_grad():
        logits, features = model.forward_with_features(x)
    assert logits.shape == (batch, num_classes)
    assert features.shape == (batch, num_features)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()


def test_forward_with_features_matches_separate_calls(built: tuple[str, ImageClassifier]) -> None:
    name, model = built
    x = _input(name)
    with torch.no_grad():
        logits, features = model.forward_with_features(x)
        torch.testing.assert_close(features, model.forward_features(x))
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(logits, model.forward_head(features))


def test_normalisation_is_inside_the_model(built: tuple[str, ImageClassifier]) -> None:
    name, model = built
    x = _input(name)
    with torch.no_grad():
        expected = model._features((x - model.mean) / model.std)
        torch.testing.assert_close(model.forward_features(x), expected)
    # The constants are configuration, not weights: state dicts stay loadable from other code.
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


@pytest.mark.parametrize("shape_change", ["channels", "ndim"])
def test_wrong_input_shape_raises(built: tuple[str, ImageClassifier], shape_change: str) -> None:
    name, model = built
    channels, size, _, _, _ = MODEL_SPECS[name]
    x = torch.rand(1, channels + 1, size, size) if shape_change == "channels" else torch.rand(channels, size, size)
    with pytest.raises(ValueError, match=rf"Expected input of shape \(B, {channels}, H, W\).*got \("):
        model(x)


def test_gradients_reach_the_input() -> None:
    torch.manual_seed(0)
    model = freeze(create_model("cifar_resnet18_small"))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_small_cnn_works_on_other_sizes_and_channels() -> None:
    model = create_model("small_cnn", in_channels=3, num_classes=4, mean=(0.1, 0.2, 0.3), std=(0.5,)).eval()
    assert model.std.flatten().tolist() == [0.5, 0.5, 0.5]
    for size in (8, 9, 28, 32):
        assert model(torch.rand(2, 3, size, size)).shape == (2, 4)


def test_create_model_options() -> None:
    model = create_model("resnet18_cifar", num_classes=7, in_channels=1, mean=(0.5,), std=(0.25,), checkpoint_path=None)
    assert (model.num_classes, model.in_channels) == (7, 1)
    assert model.mean.flatten().tolist() == [0.5] and model.std.flatten().tolist() == [0.25]
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    defaults = create_model("small_cnn", num_classes=None, mean=None)  # unset options keep the defaults
    assert (defaults.num_classes, defaults.mean.flatten().tolist()) == (10, [0.5])


def test_cifar_resnet18_small_depth_is_18() -> None:
    model = create_model("cifar_resnet18_small")
    convs = [m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in name]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 18
    assert [layer[0].conv1.out_channels for layer in (model.layer1, model.layer2, model.layer3)] == [16, 32, 64]


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("wrn28_10", ["conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.3.bn2.running_var"]),
        ("resnet18_cifar", ["conv1.weight", "layer1.0.bn1.weight", "layer4.0.shortcut.0.weight", "linear.weight"]),
        ("resnet50", ["body.conv1.weight", "body.layer4.2.bn3.weight", "head.weight"]),
    ],
)
def test_parameter_names_follow_the_common_layouts(name: str, keys: list[str]) -> None:
    # External checkpoints of these layouts (e.g. RobustBench's standard WRN-28-10) load unchanged.
    state_dict = create_model(name).state_dict()
    assert all(key in state_dict for key in keys)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": (0.1, 0.2)}, r"Expected `mean` with 1 or 3 values, got 2"),
        ({"std": (0.2, 0.0, 0.2)}, r"Expected every `std` value > 0"),
        ({"num_classes": 0}, r"Expected `num_classes` to be a positive int, got 0"),
    ],
)
def test_invalid_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("cifar_resnet18_small", **kwargs)


def test_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match=r"Unknown model 'nope'; available: .*small_cnn"):
        create_model("nope")


def test_register_model_adds_and_warns_on_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_MODEL_BUILDERS", dict(registry._MODEL_BUILDERS))

    @register_model
    def tiny_digits(num_classes: int = 3) -> ImageClassifier:
        return create_model("small_cnn", num_classes=num_classes)

    assert "tiny_digits" in list_models()
    assert create_model("tiny_digits", num_classes=5).num_classes == 5
    with pytest.warns(UserWarning, match="Overwriting model 'tiny_digits'"):
        register_model(tiny_digits)


def test_freeze() -> None:
    model = create_model("small_cnn").train()
    assert freeze(model) is model
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def _perturbed(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every entry changed (so a successful load is visible)."""
    return {key: value + 1 for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"state_dict": {f"net.module.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "module-prefix", "lightning-model-prefix", "nested-prefixes"],
)
def test_load_classifier_weights_round_trip(tmp_path: Path, wrap: object) -> None:
    torch.manual_seed(0)
    source = create_model("cifar_resnet18_small")
    target_sd = _perturbed(source)
    path = str(tmp_path / "weights.pt")
    torch.save(wrap(target_sd), path)
    model = create_model("cifar_resnet18_small", checkpoint_path=path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, target_sd[key])


def test_load_keeps_a_model_whose_own_keys_start_with_a_wrapper_name(tmp_path: Path) -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(2, 2)

    holder = Holder()
    path = str(tmp_path / "holder.pt")
    expected = _perturbed(holder)
    torch.save(expected, path)
    load_classifier_weights(holder, path)
    torch.testing.assert_close(holder.net.weight, expected["net.weight"])


def test_load_classifier_weights_errors(tmp_path: Path) -> None:
    model = create_model("cifar_resnet18_small")
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        load_classifier_weights(model, str(tmp_path / "missing.pt"))

    partial = {k: v for k, v in model.state_dict().items() if k != "linear.bias"}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"1 missing keys \['linear.bias'\], 1 unexpected keys \['extra.weight'\]"):
        load_classifier_weights(model, str(tmp_path / "partial.pt"))

    wrong = create_model("cifar_resnet18_small", num_classes=3).state_dict()
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"'linear.weight' has shape \(3, 64\) in the file and \(10, 64\)"):
        load_classifier_weights(model, str(tmp_path / "wrong.pt"))

    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="Expected a state dict"):
        load_classifier_weights(model, str(tmp_path / "list.pt"))


def test_resnet50_local_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pass `weights_path`"):
        create_model("resnet50", weights_path=str(tmp_path / "resnet50.pth"))
    torch.manual_seed(3)
    reference = tv_resnet50(weights=None, num_classes=5).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    model = create_model("resnet50", num_classes=5, weights_path=str(tmp_path / "resnet50.pth")).eval()
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference((x - mean) / std))


def test_small_cnn_learns_digits() -> None:
    digits = load_digits()
    images = torch.tensor(digits.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = create_model("small_cnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    epochs, batch = 4, 64
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=epochs * (len(train) // batch))
    model.train()
    for _ in range(epochs):
        for chunk in torch.randperm(len(train), generator=generator).split(batch):
            if len(chunk) < batch:
                continue
            index = train[chunk]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(dim=1) == labels[test]).float().mean().item()
    assert accuracy >= 0.95


def test_resnet50_reads_torchvision_layout_weights(tmp_path):
    from torchvision.models import resnet50 as tv_resnet50

    from dad.models import create_model, load_classifier_weights

    net = tv_resnet50(weights=None, num_classes=7)
    torch.save(net.state_dict(), tmp_path / "tv.pth")  # keys conv1.*, layer1.*, fc.*
    model = load_classifier_weights(create_model("resnet50", num_classes=7, in_channels=3), str(tmp_path / "tv.pth"))
    torch.testing.assert_close(model.head.weight, net.fc.weight)
    torch.testing.assert_close(model.body.conv1.weight, net.conv1.weight)
    with pytest.raises(ValueError, match="3-channel"):
        create_model("resnet50", in_channels=1)
