"""Fine-tuning helpers: which parameters are the new head, and frozen BatchNorm statistics."""

from __future__ import annotations

from torch import nn

from crackray.models.classifiers import LogitHead


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters: the head is every `LogitHead` (the crack head that replaced
    the ImageNet classifier); the backbone is the rest. Works through a DDP wrapper."""
    head_ids = {id(p) for m in model.modules() if isinstance(m, LogitHead) for p in m.parameters()}
    if not head_ids:
        raise ValueError(f"{type(model).__name__} has no LogitHead: cannot tell head from backbone")
    params = list(model.parameters())
    return [p for p in params if id(p) not in head_ids], [p for p in params if id(p) in head_ids]


def train_mode(model: nn.Module, freeze_bn: bool) -> nn.Module:
    """`model.train()`, with every BatchNorm left in eval mode when `freeze_bn`.

    In eval mode BatchNorm normalises with its (pretrained) running statistics and stops
    updating them, so small per-worker batches, or batches of one class, cannot pull the
    statistics away from the ones the backbone learned; its scale and shift still train.
    `model.train()` resets the mode of every layer, hence one call that does both.
    """
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model
