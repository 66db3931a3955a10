"""The run config: data, model, loss, optimiser, training and tracking sections, each strict
(unknown keys are errors) and typed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    path: str = "data/demo"  # folder of Parquet shards written by `crackray prepare`
    # Make synthetic demo tiles at `path` when it is absent (the quickstart's embedded default).
    synthetic_if_missing: bool = False
    synthetic_n: int = Field(400, ge=8)
    image_size: int = Field(224, ge=16, le=1024)
    augment: float = Field(1.0, ge=0.0, le=1.0)  # 0 = none; 1 = flips, rot90, full colour jitter
    balanced_sampling: bool = False  # oversample cracks to ~50 % of each training epoch
    # Segmentation (segdec) data options.
    segmented_fraction: float = Field(1.0, ge=0.0, le=1.0)  # positives that keep their mask
    dilate: int = Field(1, ge=1)  # k x k dilation of ground-truth masks; 1 = none
    use_negatives: bool = True
    frequency_sampling: bool = False  # draw negatives by how rarely they were used

    @field_validator("dilate")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd (a centred k x k kernel)")
        return v

    @model_validator(mode="after")
    def _one_resampling(self) -> DataConfig:
        if self.balanced_sampling and self.frequency_sampling:
            raise ValueError(
                "data.balanced_sampling and data.frequency_sampling both balance an epoch's "
                "classes: set one of them to false"
            )
        return self


class ModelConfig(_Strict):
    name: str = "simple_cnn"
    # ImageNet weights. torchvision models download them once (internet needed on first use);
    # efficientnet_lite0's ship in a package, so it works offline.
    pretrained: bool = False
    # A local weights file instead of `pretrained`: the backbone's ImageNet state dict in its
    # library's layout (head replaced), or a crackray model file / state dict (head kept).
    weights: str | None = None
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # BatchNorm keeps its pretrained running statistics during training (eval mode), so
    # small or one-class batches cannot skew them; its scale and shift still learn.
    freeze_bn: bool = False

    @model_validator(mode="after")
    def _weights_source(self) -> ModelConfig:
        if self.pretrained and self.weights is not None:
            raise ValueError("model.weights replaces model.pretrained: set pretrained to false")
        if self.freeze_bn and not (self.pretrained or self.weights is not None):
            raise ValueError(
                "model.freeze_bn keeps pretrained BatchNorm statistics: it needs "
                "model.pretrained or model.weights"
            )
        return self


class LossConfig(_Strict):
    name: Literal["bce", "focal"] = "bce"
    # none: every sample weighs 1; inverse_frequency: pos_weight = negatives / positives of one
    # training epoch as sampled (about 1 with balanced or frequency sampling, which already
    # balance it); explicit: use `pos_weight` below, not with a sampling that balances.
    class_weighting: Literal["none", "inverse_frequency", "explicit"] = "none"
    pos_weight: float = Field(1.0, gt=0.0)
    focal_alpha: float = Field(0.25, ge=0.0, le=1.0)
    focal_gamma: float = Field(2.0, ge=0.0)
    # segdec: total = seg_weight * seg_loss + delta_cls * dec_weight * dec_loss
    delta_cls: float = Field(1.0, ge=0.0)
    dynamic_balance: bool = False
    weighted_seg: bool = False
    weighted_seg_p: float = Field(2.0, gt=0.0)
    weighted_seg_max: float = Field(3.0, gt=0.0)


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["none", "cosine", "plateau", "onecycle"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    # Fine-tuning: the backbone learns at lr * backbone_lr_scale and the new crack head at lr,
    # so large early steps of a random head do not wash out pretrained features.
    backbone_lr_scale: float = Field(1.0, gt=0.0)
    # Head-only warm-up: the backbone's learning rate is 0 for the first N epochs.
    freeze_backbone_epochs: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _freeze_needs_a_step_schedule(self) -> OptimConfig:
        if self.freeze_backbone_epochs and self.scheduler not in ("cosine", "none"):
            raise ValueError(
                f"optim.freeze_backbone_epochs works with optim.scheduler cosine or none, "
                f"not {self.scheduler}"
            )
        return self


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0.0)
    # torch threads of each worker on CPU. None: one per CPU the worker reserves (Ray's
    # default). More (up to the cores) lets a compute-bound model use the CPUs kept for
    # ingest while decode tasks sleep; they still get their turn by time-slicing.
    threads_per_worker: int | None = Field(None, ge=1)
    # Ray Train's placement group: PACK fills a node first (fast collectives); SPREAD puts the
    # workers on different nodes where it can (spreads memory, survives one node's loss).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    batch_size: int = Field(32, ge=1)  # per worker
    eval_batch_size: int = Field(64, ge=1)
    seed: int = 0
    grad_clip: float | None = Field(1.0, gt=0.0)
    bf16: bool = True  # autocast to bfloat16 on GPU; ignored on CPU
    early_stopping_patience: int = Field(5, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the latest checkpoint
    gradient_adjustment: bool = False  # segdec: no decision-loss gradient into the seg subnet
    # What "better" means, one threshold-free validation score for the best checkpoint, early
    # stopping, the plateau scheduler, ASHA, TPE, tune's ranking and report's trials table
    # (logged every epoch as val/objective; see scores.py). F1 at a fixed 0.5 would punish a
    # trial whose loss or sampling moved the calibration, which select re-thresholds anyway.
    objective: Literal["ap", "f1_best", "recall_at_precision"] = "ap"
    objective_min_precision: float = Field(0.5, gt=0.0, le=1.0)  # recall_at_precision's floor
    # segdec: which validation score picks the best checkpoint: the decision objective above,
    # the pixel F1 of `pixel_protocol`, or their mean.
    best_model: Literal["seg", "dec", "both"] = "dec"
    # segdec pixel metric that `best_model: seg|both` and select's mask threshold use:
    # "symmetric" (2-px tolerance both ways, pooled) or "segdec" (the SegDec papers' protocol).
    pixel_protocol: Literal["symmetric", "segdec"] = "symmetric"
    log_masks_every: int = Field(5, ge=1)  # segdec: epochs between predicted-mask artifacts


class TrackingConfig(_Strict):
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (the embedded default).
    uri: str | None = None
    experiment: str | None = None  # None: the experiment file's stem


class RunConfig(_Strict):
    """Everything one training run needs; `crackray train` uses it alone."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _one_imbalance_correction(self) -> RunConfig:
        """An explicit crack weight on top of an epoch already sampled to balance corrects the
        imbalance twice (inverse_frequency is computed from the sampled epoch: no conflict)."""
        sampling = [key for key in ("balanced_sampling", "frequency_sampling")
                    if getattr(self.data, key)]
        if self.loss.class_weighting == "explicit" and sampling:
            raise ValueError(
                f"loss.class_weighting=explicit (loss.pos_weight={self.loss.pos_weight}) and "
                f"data.{sampling[0]}=true both correct the class imbalance: use one of them "
                "(or class_weighting inverse_frequency, computed from the sampled epoch)"
            )
        return self
