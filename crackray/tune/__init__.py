"""Tuning jobs. `job.run_tuning` is `crackray tune`; `space` turns the YAML search into Optuna
distributions, `resources` fits trials into the cluster, `trial` is what runs per trial and
`results` closes the job (ranking, test pass, trials table)."""
