"""`Tracker` reads for select / predict / report / ui: runs, their children and metrics,
models logged into runs, and the registry (aliases, never the deprecated stages)."""

from __future__ import annotations

from pathlib import Path

from crackray.scratch import scratch_folder
from crackray.tracking.store import KIND_TAG, PARENT_TAG, TrackingError, redact


class RegistryMixin:
    """`Tracker` methods over runs and the model registry (needs `client` and `uri`)."""

    def get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException for an unknown or malformed id
            raise TrackingError(f"no MLflow run {run_id!r} in {redact(self.uri)}") from None

    def latest_run_anywhere(self, kind: str, experiment: str | None = None):
        """The most recent run of `kind` in `experiment` (by name), or in any experiment."""
        if experiment is not None:
            if self.client.get_experiment_by_name(experiment) is None:
                raise TrackingError(
                    f"no MLflow experiment named {experiment!r} in {redact(self.uri)}"
                )
            return self.latest_run(experiment, kind=kind)
        ids = [e.experiment_id for e in self.client.search_experiments()]
        return self._newest(ids, f"tags.`{KIND_TAG}` = '{kind}'") if ids else None

    def latest_crackray_experiment(self) -> str | None:
        """The id of the experiment holding the most recently started crackray run."""
        ids = [e.experiment_id for e in self.client.search_experiments()]
        run = self._newest(ids, f"tags.`{KIND_TAG}` != ''") if ids else None
        return run.info.experiment_id if run is not None else None

    def child_runs(self, parent_run_id: str, kind: str | None = None) -> list:
        """Every run whose `mlflow.parentRunId` is `parent_run_id` (optionally of one kind),
        oldest first."""
        parent = self.get_run(parent_run_id)
        query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
        if kind:
            query += f" and tags.`{KIND_TAG}` = '{kind}'"
        return list(
            reversed(
                self.client.search_runs(
                    [parent.info.experiment_id],
                    filter_string=query,
                    order_by=["attributes.start_time DESC"],
                    max_results=10000,
                )
            )
        )

    def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in self.client.get_metric_history(run_id, key)}

    def log_pyfunc_model(
        self,
        run_id: str,
        python_model,
        *,
        artifacts: dict[str, str],
        input_example,
        signature,
        metadata: dict,
        pip_requirements: list[str],
    ) -> str:
        """`mlflow.pyfunc.log_model` into `run_id`; returns the model URI. Explicit pip
        requirements spare MLflow loading the model in a subprocess to infer them."""
        import mlflow
        import mlflow.pyfunc

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=python_model,
                artifacts=artifacts,
                input_example=input_example,
                signature=signature,
                metadata=metadata,
                pip_requirements=pip_requirements,
            )
        return info.model_uri

    def register(self, model_uri: str, name: str, alias: str, tags: dict | None = None) -> str:
        """Register `model_uri` as a new version of `name` and point `alias` at it (aliases,
        never the deprecated stages); returns the version."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        version = mlflow.register_model(model_uri, name, tags=tags)
        self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def model_version(self, name: str, alias_or_version: str):
        """The registered version behind `name@alias` (or `name/version`)."""
        from mlflow.exceptions import MlflowException

        try:
            registered = self.client.get_registered_model(name)
        except MlflowException:
            raise TrackingError(f"no registered model {name!r} in {redact(self.uri)}") from None
        try:
            if alias_or_version.isdigit():
                return self.client.get_model_version(name, alias_or_version)
            return self.client.get_model_version_by_alias(name, alias_or_version)
        except MlflowException:
            known = ", ".join(sorted(registered.aliases)) or "none"
            raise TrackingError(
                f"registered model {name!r} has no alias or version "
                f"{alias_or_version!r} (aliases: {known})"
            ) from None

    def download_uri(self, artifact_uri: str) -> Path:
        """Download any artifact URI (runs:/..., models:/..., file paths) to a temp folder."""
        import mlflow
        import mlflow.artifacts

        # models:/ URIs (registered or logged models) resolve through MLflow's process-wide
        # registry and tracking URIs, whatever `tracking_uri` says: point both at this store.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        target = str(scratch_folder("download-"))
        try:
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=target, tracking_uri=self.uri
                )
            )
        except Exception as exc:  # noqa: BLE001 - MlflowException / OSError alike
            raise TrackingError(f"cannot download {artifact_uri}: {exc}") from None
