"""engine.py on in-memory batches: plain PyTorch, no Ray, so these run in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crackray.config import RunConfig
from crackray.engine import EvalOutputs, Objective, evaluate, gather, train_one_epoch
from crackray.models import create_model


def toy_set(n: int, seed: int = 0, size: int = 16):
    """Linearly separable images: cracks are bright (+1), the rest dark (-1), plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2).float()
    shift = (labels * 2 - 1)[:, None, None, None]
    images = shift + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return images, labels


def batches_of(images, labels, sizes: list[int]):
    """Batches shaped like `pipeline.iterate_batches` output, of the given (uneven) sizes."""
    assert sum(sizes) == len(labels)
    out, start = [], 0
    for size in sizes:
        idx = range(start, start + size)
        out.append({
            "image": images[start:start + size],
            "label": labels[start:start + size],
            "surface": np.array(["D" if i % 3 else "W" for i in idx], dtype=object),
            "path": np.array([f"tile-{i:03d}.jpg" for i in idx], dtype=object),
        })
        start += size
    return out


def tiny_model_and_objective(pos_weight: float = 1.0):
    torch.manual_seed(0)
    cfg = RunConfig.model_validate({"model": {"name": "test_tiny"}})
    return create_model("test_tiny"), Objective(cfg, pos_weight, segmentation=False)


def test_training_reduces_loss_and_separates_an_easy_set():
    images, labels = toy_set(64)
    model, objective = tiny_model_and_objective()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for epoch in range(6):
        stats = train_one_epoch(model, batches_of(images, labels, [16] * 4), objective, optimizer,
                                epoch=epoch, epochs=6, grad_clip=1.0)
        assert stats["samples"] == 64
        losses.append(stats["loss"])
    assert losses[-1] < 0.5 * losses[0], losses
    val_images, val_labels = toy_set(40, seed=1)
    out = evaluate(model, batches_of(val_images, val_labels, [40]), objective)
    accuracy = ((out.probs >= 0.5) == out.targets.astype(bool)).mean()
    assert accuracy >= 0.95


def test_evaluate_counts_every_sample_once_and_sums_the_loss():
    images, labels = toy_set(31, seed=2)
    model, objective = tiny_model_and_objective(pos_weight=3.0)
    out = evaluate(model, batches_of(images, labels, [8, 8, 8, 7]), objective)

    assert out.count == 31
    assert sorted(out.paths.tolist()) == [f"tile-{i:03d}.jpg" for i in range(31)]
    np.testing.assert_array_equal(out.targets, labels.numpy().astype(np.int64))
    with torch.no_grad():
        logits = model.eval()(images)
    np.testing.assert_allclose(out.probs, torch.sigmoid(logits).numpy(), rtol=1e-5, atol=1e-6)
    # The mean over samples of the pos-weighted BCE, independent of how samples were batched.
    expected = F.binary_cross_entropy_with_logits(
        logits, labels, pos_weight=torch.tensor(3.0), reduction="sum").item()
    assert out.loss_sum == pytest.approx(expected, rel=1e-5)
    assert out.loss == pytest.approx(expected / 31, rel=1e-5)
    assert out.surfaces.tolist()[:4] == ["W", "D", "D", "W"]


def test_evaluate_of_no_batches_is_empty():
    model, objective = tiny_model_and_objective()
    out = evaluate(model, [], objective)
    assert out.count == 0 and out.loss == 0.0 and out.probs.shape == (0,)


def test_concat_keeps_order_and_weighs_losses_by_samples():
    a = EvalOutputs(probs=np.array([0.1, 0.9], np.float32), targets=np.array([0, 1]),
                    surfaces=np.array(["D", "P"], object), paths=np.array(["a", "b"], object),
                    loss_sum=2.0)
    b = EvalOutputs(probs=np.array([0.7], np.float32), targets=np.array([1]),
                    surfaces=np.array(["W"], object), paths=np.array(["c"], object),
                    loss_sum=4.0)
    both = EvalOutputs.concat([a, EvalOutputs(), b])
    assert both.paths.tolist() == ["a", "b", "c"]
    assert both.surfaces.tolist() == ["D", "P", "W"]
    np.testing.assert_array_equal(both.targets, [0, 1, 1])
    np.testing.assert_allclose(both.probs, [0.1, 0.9, 0.7])
    assert both.count == 3
    assert both.loss == pytest.approx(2.0)  # (2 + 4) / 3 samples, not the mean of 1.0 and 4.0


def test_gather_outside_distributed_is_the_identity():
    out = EvalOutputs(probs=np.array([0.3], np.float32), targets=np.array([0]), loss_sum=1.0)
    assert gather(out) is out
