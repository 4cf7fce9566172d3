"""The training app (``recap-embed-train``): a Hydra entry point over the embedding configs.

`app` is the command and `loop.Trainer` runs one job (data, model, sharding, steps, evaluation,
checkpoints). The other modules each hold one part of it: `config` (the app's own sections),
`data` (the synthetic click log) and `own_data` (Parquet splits), `model` (large + small
embeddings + an MLP), `derive` (what is taken from the training split when the config leaves it
out), `guards` (garbage refused before training, a run that turns to NaN stopped), `rundir`,
`resume`, `stop`, `keep_best` and `fingerprint` (what a run keeps on disk and how it continues),
and `report` (the sweep report of a multirun).
"""
