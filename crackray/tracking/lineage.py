"""Where a run's model comes from, in MLflow's own terms, so the UI's run page can show it:
the dataset inputs (one per split, with its context), the source tags, and the best
checkpoint as an MLflow 3 logged model linked to its run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from crackray.tracking.store import git_commit, source_name, spool

DATASET_CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT
DIGEST_LIMIT = 36  # characters MLflow's store keeps of a dataset digest
SOURCE_TAGS = ("mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit")
BEST_MODEL = "best_model"  # the logged model of a run's best checkpoint
BEST_MODEL_TYPE = "crackray-checkpoint"
BEST_MODEL_TAG = "crackray.best_model_id"  # on the run: its best checkpoint's logged model


class LineageMixin:
    """`Tracker` methods for a run's lineage (needs `client` and the buffered `_call`)."""

    def log_datasets(self, run_id: str, datasets: list[dict]) -> None:
        """Log dataset inputs, each a dict with `name`, `digest`, `source` (a path), `context`
        (training / validation / test) and `profile` (a JSON-able dict). MLflow keeps the first
        DIGEST_LIMIT characters of a digest; logging the same datasets again adds nothing."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    name=d["name"],
                    digest=d["digest"][:DIGEST_LIMIT],
                    source_type="local",
                    source=json.dumps({"uri": str(d["source"])}),
                    profile=json.dumps(d["profile"]),
                ),
                tags=[InputTag(DATASET_CONTEXT_TAG, d["context"])],
            )
            for d in datasets
        ]
        self._call(self.client.log_inputs, run_id, datasets=inputs)

    def source_tags(self, parent_run_id: str | None = None) -> dict[str, str]:
        """MLflow's source tags: the command that started this process and crackray's git
        commit; a trial (whose process is a Ray worker) inherits its tuning job's."""
        if parent_run_id is not None:
            tags = self.client.get_run(parent_run_id).data.tags
            inherited = {k: tags[k] for k in SOURCE_TAGS if k in tags}
            if inherited:
                return inherited
        return {
            "mlflow.source.name": source_name(),
            "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": git_commit(),
        }

    def log_best_model(self, run_id: str, model_file: str | Path, *, step: int,
                       tags: dict[str, str] | None = None) -> None:
        """Make `model_file` the run's MLflow 3 logged model (`best_model`, created on the
        first call, its file replaced on later ones), listed on the run page as its output at
        `step`. Buffered like every write: the file is copied first."""
        copy = spool(model_file)

        def send() -> None:
            model_id = self.best_model_id(run_id) or self._create_best_model(run_id, step)
            self.client.log_model_artifact(model_id, str(copy))
            self.client.set_logged_model_tags(
                model_id, {"crackray.epoch": str(step), **{k: str(v) for k, v in
                                                          (tags or {}).items()}})
            shutil.rmtree(copy.parent, ignore_errors=True)

        self._call(send)

    def best_model_id(self, run_id: str) -> str | None:
        """The id of the run's best-checkpoint logged model, or None before the first one."""
        if run_id not in self._best_models:
            run = self.client.get_run(run_id)
            found = self.client.search_logged_models(
                [run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND name = '{BEST_MODEL}'",
                max_results=1,
            )
            if not found:
                return None
            self._best_models[run_id] = found[0].model_id
        return self._best_models[run_id]

    def _create_best_model(self, run_id: str, step: int) -> str:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        run = self.client.get_run(run_id)
        model = self.client.create_logged_model(
            run.info.experiment_id,
            name=BEST_MODEL,
            source_run_id=run_id,
            params=dict(run.data.params),
            model_type=BEST_MODEL_TYPE,
        )
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.set_tag(run_id, BEST_MODEL_TAG, model.model_id)
        self._best_models[run_id] = model.model_id
        return model.model_id
