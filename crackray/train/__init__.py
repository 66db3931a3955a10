"""Ray Train runs. `driver.run_training` (the `crackray train` command) and `driver.build_trainer`
(one per tuning trial) are the driver side; `worker.train_fn_per_worker` runs on every worker,
with its progress and checkpoints in `state.py`, its MLflow logging in `epoch_log.py` and
optional per-worker hooks in `hooks.py`."""
