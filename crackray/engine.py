"""One epoch of training and one pass of evaluation: plain PyTorch, no Ray.

A reader can follow an epoch here without knowing Ray; `train/worker.py` wraps these functions for
Ray Train workers, and tests call them directly on in-memory batches.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from crackray.config import RunConfig
from crackray.losses import SegDecLoss, build_classification_loss
from crackray.models.finetune import train_mode

CPU = torch.device("cpu")


def crack_logits(outputs) -> torch.Tensor:
    """The per-image crack logit (B,): classifiers return it, segdec returns (logit, seg)."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


class Objective:
    """The training loss for a model family, with one call signature for the engine."""

    def __init__(self, cfg: RunConfig, pos_weight: float, segmentation: bool):
        self.segmentation = segmentation
        if segmentation:
            self.loss = SegDecLoss(cfg.loss, pos_weight=pos_weight)
        else:
            self.loss = build_classification_loss(cfg.loss, pos_weight)

    def __call__(self, outputs, batch: dict, epoch: int, epochs: int):
        """-> (mean loss over the batch, {name: float} of its parts)."""
        if self.segmentation:
            dec_logit, seg_logit = outputs
            return self.loss(
                dec_logit,
                seg_logit,
                batch["label"],
                batch["mask"],
                batch["has_mask"],
                epoch,
                epochs,
            )
        loss = self.loss(outputs, batch["label"])
        return loss, {}


def seg_probabilities(seg_logit: torch.Tensor, size) -> torch.Tensor:
    """segdec's 1/8-resolution crack logits (B, 1, h, w) -> probabilities (B, H, W) at `size`
    (the input's), as evaluation, prediction and mask overlays all need them."""
    seg = torch.sigmoid(seg_logit.float())
    return torch.nn.functional.interpolate(seg, size=tuple(size), mode="bilinear")[:, 0]


def to_uint8_maps(probabilities: torch.Tensor) -> np.ndarray:
    """Probability maps -> uint8 0..255 (a quarter of the memory for stored maps)."""
    return (probabilities * 255).round().to(torch.uint8).cpu().numpy()


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on GPU; on CPU full precision (CPU autocast is slower for small convs)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: torch.nn.Module,
    batches: Iterable[dict],
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    epochs: int,
    schedule=None,
    grad_clip: float | None = None,
    bf16: bool = False,
    device: torch.device = CPU,
    freeze_bn: bool = False,
) -> dict[str, float]:
    """Train over `batches` once; returns the sample-weighted mean loss and throughput."""
    train_mode(model, freeze_bn)
    loss_sum, samples, parts_sum = 0.0, 0, {}
    start = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(device, bf16):
            outputs = model(batch["image"])
            loss, parts = objective(outputs, batch, epoch, epochs)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if schedule is not None:
            schedule.step_batch()
        n = len(batch["label"])
        loss_sum += loss.item() * n
        samples += n
        for name, value in parts.items():
            parts_sum[name] = parts_sum.get(name, 0.0) + float(value) * n
    seconds = time.perf_counter() - start
    stats = {
        "loss": loss_sum / max(samples, 1),
        "samples": samples,
        "seconds": seconds,
        "images_per_s": samples / max(seconds, 1e-9),
        "lr": optimizer.param_groups[0]["lr"],
    }
    stats.update({name: total / max(samples, 1) for name, total in parts_sum.items()})
    return stats


@dataclass
class EvalOutputs:
    """Per-sample evaluation results of one worker (or, after `gather`, of all workers)."""

    probs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    surfaces: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    paths: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    loss_sum: float = 0.0
    # segdec only: per-image crack-probability maps and ground-truth masks (uint8 0..255 / 0..1),
    # pairs of one size each, which may differ between images (full-resolution masks)
    seg_probs: list = field(default_factory=list)
    masks: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.targets)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @classmethod
    def concat(cls, parts: list[EvalOutputs]) -> EvalOutputs:
        return cls(
            probs=np.concatenate([p.probs for p in parts]),
            targets=np.concatenate([p.targets for p in parts]),
            surfaces=np.concatenate([p.surfaces for p in parts]),
            paths=np.concatenate([p.paths for p in parts]),
            loss_sum=sum(p.loss_sum for p in parts),
            seg_probs=[m for p in parts for m in p.seg_probs],
            masks=[m for p in parts for m in p.masks],
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict],
    objective: Objective,
    *,
    epoch: int = 0,
    epochs: int = 1,
    bf16: bool = False,
    device: torch.device = CPU,
    keep_seg_maps: bool = False,
) -> EvalOutputs:
    """Predict every sample of `batches` once; the loss is summed so that means over several
    workers weigh each sample equally."""
    model.eval()
    chunks = []
    for batch in batches:
        with autocast_for(device, bf16):
            outputs = model(batch["image"])
            loss, _ = objective(outputs, batch, epoch, epochs)
        probs = torch.sigmoid(crack_logits(outputs).float())
        chunk = EvalOutputs(
            probs=probs.cpu().numpy(),
            targets=batch["label"].cpu().numpy().astype(np.int64),
            surfaces=np.asarray(batch["surface"], dtype=object),
            paths=np.asarray(batch["path"], dtype=object),
            loss_sum=loss.item() * len(batch["label"]),
        )
        if keep_seg_maps and isinstance(outputs, tuple):
            chunk.seg_probs, chunk.masks = _scored_maps(outputs[1], batch)
        chunks.append(chunk)
    return EvalOutputs.concat(chunks) if chunks else EvalOutputs()


def _scored_maps(seg_logit: torch.Tensor, batch: dict) -> tuple[list, list]:
    """(uint8 probability maps, ground-truth masks) to score pixel metrics on. A batch with
    `score_masks` (full-resolution masks of any size, `inference.split_batches`) gets each map
    upsampled to its own mask: shrinking a mask to the training size breaks thin cracks.
    Otherwise (the per-epoch Ray validation) both stay at the training size."""
    if "score_masks" not in batch:
        seg = seg_probabilities(seg_logit, batch["mask"].shape[-2:])
        return list(to_uint8_maps(seg)), list(batch["mask"].cpu().numpy().astype(np.uint8))
    masks = list(batch["score_masks"])
    maps = [to_uint8_maps(seg_probabilities(seg_logit[i : i + 1], mask.shape))[0]
            for i, mask in enumerate(masks)]
    return maps, masks


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(outputs: EvalOutputs) -> EvalOutputs | None:
    """All workers' outputs on rank 0, None on the others (each sample once: the workers'
    parts are disjoint). Only rank 0 scores an epoch; `broadcast` shares its numbers."""
    if not _distributed():
        return outputs
    parts: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(outputs, parts, dst=0)
    return EvalOutputs.concat(parts) if parts is not None else None


def broadcast(value):
    """Rank 0's `value` on every worker (what the others pass is ignored)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every worker. DDP keeps the
    weights equal, but each worker's last training forward updated its own running stats, so
    without this the workers would evaluate slightly different models."""
    if not _distributed():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
