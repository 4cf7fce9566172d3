"""The training app (``recap-embed-train``): a Hydra entry point over the embedding configs.

`app` is the command and `loop.Trainer` runs one job: it puts the run together in order and
takes every step through `Trainer.train_step`. The other modules each hold one part of it:
`config` (the app's own sections), `preflight` (the checks before anything is read or built),
`data` (the synthetic click log, batches), `own_data` (one Parquet split read and checked) and
`splits` (the splits in memory: validation held out, discrete codes), `derive` (what is taken from
the training split when the config leaves it out), `components` (embedding modules, rows,
metrics and optimizers built from the parsed config), `model` (large + small embeddings + an
MLP), `guards` (garbage refused before training, a run that turns to NaN stopped), `rundir`,
`resume`, `stop`, `keep_best` and `fingerprint` (what a run keeps on disk and how it continues),
`results` (metrics.json), and `report` (the sweep report of a multirun).
"""
