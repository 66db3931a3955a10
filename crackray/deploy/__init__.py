"""From a trained run to a deployed detector, without Ray unless a job is large: `select`
(choose, calibrate, test once, register), `predict` (tiles and whole photos)."""
