"""The training loop of `recap-embed-train`, usable without Hydra: `train(cfg, output_dir)`.

Every rank runs it; files are written by rank 0 only (the checkpoint by all ranks together).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from recap_embed.config import ConfigError, ParsedConfig, table_specs, validate
from recap_embed.errors import RANK_FAILURES
from recap_embed.files import atomic_write_text
from recap_embed.distributed import describe_plan, format_plan, plan_placements, resolve_device, save_plan_file, shard
from recap_embed.hydra_guards import app_allowed_targets
from recap_embed._instantiate import build, check_targets
from recap_embed.io.checkpoint import restore_checkpoint
from recap_embed.io.pretrained import agree, check_pretrained, collective, load_pretrained
from recap_embed.io.vocab import Vocab
from recap_embed.io.vocab_mapper import VocabMapper
from recap_embed.modules import StratifiedMetrics, Stratifiers, table_stats
from recap_embed.modules.names import check_module_names
from recap_embed.optim import EmbeddingLRScheduler, combined_optimizer

from . import derive
from .config import DataSource, ValidationMetric
from .data import Batch, Examples, batches, generate_synthetic, num_batches, oracle_auroc
from .fingerprint import check_warm_start_vocabs, read_checkpoint_info, vocab_fingerprint
from .guards import (
    check_dense_memory, check_examples, check_loss, check_output_dir, check_settings, check_weights_finite, dense_optimizer_class,
)
from .keep_best import KeepBest
from .resume import (
    CheckpointPolicy, RunDirLock, final_metrics, materialize_dense_state, progress_state, read_progress, resume_point, supersede,
)
from .stop import StepAgreement, StopRequested, StopSignals
from .model import RecapModel
from .own_data import Columns, DataError, DiscreteCodes, read_split

log = logging.getLogger("recap_embed.train")


def rank_and_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device_type: str) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


#: Sparse features of the app's batches (`data.make_batch`): one raw id per example each.
SPARSE_FEATURES = ("user", "item")


def all_ranks(fn: Any, *args: Any) -> Any:
    """`fn(*args)` on every rank, then an agreement: when any rank failed, every rank raises
    (the failed ones their own error), so no rank is left waiting in a later collective and
    each cause is printed once (`recap_embed.errors.report_and_exit`)."""
    error, result = None, None
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement
        if getattr(e, RANK_FAILURES, None) is not None:  # from an agreement inside: every rank raised
            raise
        error = e
    agree(error, enabled=collective())
    return result


def apply_threads(threads: Optional[int]) -> int:
    """Set this rank's torch (intra-op) threads from `train.threads`; returns the count in use.

    One per rank by default, as torchrun sets OMP_NUM_THREADS=1 for its workers: ranks sharing a
    host do not oversubscribe its cores, and the step's many small kernels (lookups of a batch,
    an MLP of a few thousand weights) lose more to waking and syncing threads than they gain.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"train.threads: {threads!r} is not allowed; use a positive number of threads per rank, or null for torch's default")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_vocab_paths(cfg: DictConfig, output_dir: Path) -> Dict[str, Any]:
    """Point every table with neither `vocab` nor `num_embeddings` at the vocab the app builds
    from the training split (``<run dir>/vocabs/<table>``); returns {table key: spec}."""
    from omegaconf import open_dict

    planned = {}
    for spec in table_specs(cfg.embeddings):
        if spec.vocab is None and spec.num_embeddings is None:
            path = Path(output_dir) / derive.VOCAB_DIR / spec.name
            with open_dict(cfg.embeddings.tables[spec.key]):
                cfg.embeddings.tables[spec.key].vocab = str(path)
            planned[spec.key] = spec
    return planned


def preflight(cfg: DictConfig, device: torch.device, world: int) -> ParsedConfig:
    """Every check that needs neither data nor tables, before anything is generated or built:
    `_target_`s against the allowlist, the config's rules, the features tables read and the
    pretrained snapshots (manifests and file sizes). Returns the parsed config every builder takes."""
    check_targets(cfg, app_allowed_targets(cfg))
    parsed = validate(cfg, device=str(device), num_discrete_features=len(cfg.data.discrete_columns))
    check_settings(cfg)
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the {world} ranks; use a multiple of {world}")
    fraction = cfg.data.validation_fraction
    if not 0 <= fraction < 1:
        raise ConfigError(f"data.validation_fraction: {fraction} is not allowed; use a share of the training rows in [0, 1) (0: no validation split)")
    Columns.from_config(cfg.data).check_distinct()
    _keep_best_from(cfg.train)  # its settings, checked
    assert parsed.embeddings is not None
    specs = list(parsed.embeddings.tables)
    for spec in specs:
        unknown = [f for f in spec.feature_names if f not in SPARSE_FEATURES]
        if unknown:
            raise ConfigError(
                f"{spec.path}: reads feature(s) {unknown}, which the training data does not have; the data's "
                f"features: {', '.join(SPARSE_FEATURES)} (set feature_names, or remove the table with ~{spec.path})"
            )
    check_module_names((s.path, s.name) for s in specs)
    check_dense_memory(cfg, specs, list(parsed.small_embeddings or ()), device)
    check_pretrained(specs)
    return parsed


def _keep_best_from(train_cfg: Any) -> KeepBest:
    stop = train_cfg.early_stopping
    metric = stop.metric if isinstance(stop.metric, ValidationMetric) else ValidationMetric[str(stop.metric)]
    return KeepBest(metric.value, metric is ValidationMetric.auroc, stop.patience, stop.min_delta)


def prepare_data(cfg: DictConfig, rank: int) -> Tuple[Dict[str, Examples], DiscreteCodes, Dict[str, Dict[str, float]]]:
    """Generate (rank 0, once) or read the splits, check them, hold out the validation rows and
    encode the discrete columns with codes fitted on the training rows.

    Returns the examples per split (`train`, `validation` when held out, `eval`; raw ids,
    codes), the codes, and per split the share of rows per column whose value training lacks.
    """
    data = cfg.data
    if data.source == DataSource.synthetic:
        # The agreement is the barrier; a failure on rank 0 stops every rank.
        all_ranks(lambda: generate_synthetic(Path(data.dir), data.synthetic, data.seed) if rank == 0 else None)
        train_path, eval_path = str(Path(data.dir) / "train.parquet"), str(Path(data.dir) / "eval.parquet")
    else:
        if not data.train_path or not data.eval_path:
            raise ConfigError("data.source=parquet needs data.train_path and data.eval_path (parquet files or directories)")
        train_path, eval_path = str(data.train_path), str(data.eval_path)
    columns = Columns.from_config(data)
    tables = {"train": read_split(train_path, columns, "data.train_path"), "eval": read_split(eval_path, columns, "data.eval_path")}
    n = tables["train"].num_rows
    held = int(round(float(data.validation_fraction) * n))
    if held:
        order = np.random.default_rng(int(data.seed)).permutation(n)
        train = tables["train"]
        tables["validation"] = train.take(np.sort(order[:held]))
        tables["train"] = train.take(np.sort(order[held:]))
        labels = tables["validation"].column(columns.label).to_numpy()
        if labels.min() == labels.max():
            raise DataError(
                f"{train_path}: the {held} rows held out for validation (data.validation_fraction={data.validation_fraction}) "
                f"all have label {int(labels[0])}; hold out more rows, or set data.validation_fraction=0"
            )
    elif float(data.validation_fraction) > 0:
        raise DataError(f"{train_path}: data.validation_fraction={data.validation_fraction} of its {n} rows holds out no row; raise it, or set 0")
    batch = int(cfg.train.batch_size)
    if tables["train"].num_rows < batch:
        after = f" after holding out {held} for validation (data.validation_fraction)" if held else ""
        raise DataError(
            f"{train_path}: {tables['train'].num_rows} training rows{after} are fewer than train.batch_size={batch}, "
            f"so no full batch trains; lower train.batch_size"
        )
    codes = DiscreteCodes.fit(tables["train"], columns.discrete)
    examples: Dict[str, Examples] = {}
    unseen: Dict[str, Dict[str, float]] = {}
    for split, table in tables.items():
        discrete, unseen[split] = codes.encode(table, eval_path if split == "eval" else train_path)
        examples[split] = Examples(
            torch.from_numpy(table.column(columns.user).to_numpy().copy()),
            torch.from_numpy(table.column(columns.item).to_numpy().copy()),
            torch.from_numpy(discrete),
            torch.from_numpy(table.column(columns.label).to_numpy().copy()),
        )
    if rank == 0:
        for split in ("validation", "eval"):
            if split in unseen and columns.discrete:
                log.info("%s: rows with a discrete value the training split lacks: %s", split, ", ".join(f"{c} {r:.2%}" for c, r in unseen[split].items()))
    return examples, codes, unseen


class Trainer:
    """Builds the model from the config and runs the loop; see `train` for the one-call form."""

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.device = resolve_device(cfg.sharding.device)
        # The group is ours to close when torchrun's ranks join it here, or `shard` makes one.
        self.owns_process_group = not (dist.is_available() and dist.is_initialized())
        init_distributed(self.device.type)
        self.rank, self.world = rank_and_world()
        self.threads, self.built_vocabs, self.parsed = all_ranks(self._preflight)
        self.allowed_targets = app_allowed_targets(cfg)
        # One run per run dir; a rerun continues from its latest checkpoint (or starts afresh).
        self.lock = RunDirLock(self.output_dir)
        all_ranks(self._claim_run_dir)
        self.resume_from = resume_point(self.output_dir, bool(cfg.train.resume)) if cfg.train.checkpoint else None
        torch.manual_seed(cfg.train.seed)
        self.examples, self.codes, self.unseen = all_ranks(prepare_data, cfg, self.rank)
        self.derived_small, self.derived_strata = all_ranks(self._derive)
        large, small = all_ranks(self._build_modules)
        self.vocab = VocabMapper({f: large.vocabs[s.name] for s in large.specs if s.name in large.vocabs for f in s.feature_names})
        # Raw ids become rows once per split, vectorised over the whole split, so the step does not
        # pay for it (the mapper would do the same per batch; see BENCHMARKS.md, section 7).
        self.oov: Dict[str, Dict[str, float]] = {}
        self.examples = {split: self._to_rows(split, examples) for split, examples in self.examples.items()}
        self.vocab_fingerprints = {s.name: (vocab_fingerprint(large.vocabs[s.name]) if s.name in large.vocabs else None) for s in large.specs}
        model = RecapModel(large, small, list(cfg.model.hidden), cfg.model.interaction)
        self.model = shard(model, self.parsed, device=self.device)
        self.specs = large.specs
        # Rows stream straight into the weights (no staging copy: 1.8x faster, +0.07x memory instead
        # of +1.07x). The weights are fresh initialisation, so an I/O error mid-table loses nothing:
        # the job stops, and the snapshot was checked (manifest, names, shapes, sizes) beforehand.
        self.pretrained = load_pretrained(self.model, self.specs, staging=False)
        dense = cfg.train.dense_optimizer
        dense_cls = dense_optimizer_class(dense.name)
        self.optimizer = combined_optimizer(self.model, lambda params: dense_cls(params, lr=dense.lr, weight_decay=dense.weight_decay))
        self.scheduler = EmbeddingLRScheduler(self.model, self.optimizer)
        if self.derived_strata is not None:
            parsed = replace(self.parsed, stratifiers=validate({"strata": self.derived_strata}, section="stratifiers").stratifiers)
            strata = build(cfg.stratifiers, parsed, allowed_targets=self.allowed_targets, strata=self.derived_strata)
        else:
            strata = build(cfg.stratifiers, self.parsed, allowed_targets=self.allowed_targets)
            if self.rank == 0:
                for note in derive.describe_given_strata(list(strata), self.codes):
                    log.warning("%s", note)
        self.metrics = StratifiedMetrics({"auroc": BinaryAUROC(), "loss": MeanMetric()}, strata).to(self.device)
        # Validation runs every eval_every steps: overall metrics only, the strata are for eval.
        self.validation_metrics = StratifiedMetrics({"auroc": BinaryAUROC(), "loss": MeanMetric()}, Stratifiers()).to(self.device)
        self.loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
        self.step = 0
        self.epoch = 0
        self.running: Optional[float] = None
        self.curve: List[Dict[str, float]] = []
        self.keep_best = _keep_best_from(cfg.train)
        self.stopped_early: Optional[str] = None
        self.policy = CheckpointPolicy(
            self.output_dir / "checkpoints", every=int(cfg.train.checkpoint_every), keep=int(cfg.train.keep_checkpoints),
            asynchronous=bool(cfg.train.checkpoint_async), rank=self.rank, info=self._checkpoint_info,
        )
        self._resumed_step: Optional[int] = None
        if self.resume_from is not None:
            self._resume(self.resume_from)
            self._resumed_step = self.step

    def _preflight(self) -> tuple:
        """Threads, the vocabs the app will build, then `preflight`: nothing read or built yet."""
        threads = apply_threads(self.cfg.train.threads)
        try:
            planned = build_vocab_paths(self.cfg, self.output_dir)
        except ConfigError:
            planned = {}  # a malformed table: validate names every problem next
        parsed = preflight(self.cfg, self.device, self.world)
        return threads, planned, parsed

    def _derive(self) -> tuple:
        """Small tables and strata for empty sections, and the vocabs planned by `build_vocab_paths`,
        from the training rows; rank 0 writes them (and the codes) into the run dir."""
        cfg, train = self.cfg, self.examples["train"]
        d = cfg.data.derive
        small = strata = None
        if d.small_embeddings and not len(cfg.small_embeddings.get("tables") or {}):
            small = derive.derive_small_tables(self.codes, int(d.max_dim))
        if d.stratifiers and not len(cfg.stratifiers.get("strata") or {}):
            strata = derive.derive_strata(self.codes, int(d.strata_per_column))
        by_feature = {"user": train.user_ids.numpy(), "item": train.item_ids.numpy()}
        vocab_ids = {key: derive.vocab_from_ids([by_feature[f] for f in spec.feature_names]) for key, spec in self.built_vocabs.items()}
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for key, spec in self.built_vocabs.items():
                derive.write_vocab(Path(cfg.embeddings.tables[key].vocab), vocab_ids[key], spec.path)
            atomic_write_text(self.output_dir / "discrete_codes.json", json.dumps(self.codes.to_json(), indent=2) + "\n")
            if small is not None or strata is not None:
                atomic_write_text(self.output_dir / "derived.yaml", derive.as_yaml(small, strata))
            if small:
                log.info("small tables derived from the data: %s", ", ".join(f"{k} {t['num_embeddings']}x{t['embedding_dim']}" for k, t in small.items()))
            if strata:
                log.info("strata derived from the data: %s", ", ".join(strata))
        return small, strata

    def _claim_run_dir(self) -> None:
        check_output_dir(self.output_dir)
        if self.rank == 0:
            self.lock.acquire()
            if not self.cfg.train.resume:
                supersede(self.output_dir)

    def _checkpoint_info(self) -> Dict[str, Any]:
        return {"format": "recap_embed.checkpoint", "version": 1, "vocabs": self.vocab_fingerprints, "step": self.step,
                "trajectory": self._trajectory()}

    def _trajectory(self) -> Dict[str, Any]:
        """Settings that decide which batches come after a resume; a change is allowed but said."""
        cfg = self.cfg
        return {"train.batch_size": int(cfg.train.batch_size), "train.seed": int(cfg.train.seed), "data.seed": int(cfg.data.seed),
                "train_rows": len(self.examples["train"])}

    def app_state(self) -> Dict[str, Any]:
        """What a checkpoint holds; its weights are checked finite first (nothing broken is saved)."""
        all_ranks(check_weights_finite, self.model, self.step)  # every rank stops if one holds nan
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "progress": progress_state(self.step, self.epoch, self.running, self.curve), "keep_best": self.keep_best}

    def _resume(self, path: Path) -> None:
        """Continue from checkpoint `path` of this run dir: its vocabularies must be this run's."""
        info = read_checkpoint_info(str(path)) or {}
        saved = info.get("vocabs")
        if saved is not None and saved != self.vocab_fingerprints:
            differ = sorted(k for k in set(saved) | set(self.vocab_fingerprints) if saved.get(k) != self.vocab_fingerprints.get(k))
            raise ConfigError(
                f"train.resume: checkpoint {path} was trained with other vocabularies for table(s) {differ} than this run "
                f"has (another data.dir or vocab): resuming would give its rows other ids; set train.resume=false to start "
                f"afresh (the old checkpoints are kept aside), or use the data it was trained on"
            )
        materialize_dense_state(self.optimizer)
        changed = {k: (v, self._trajectory().get(k)) for k, v in (info.get("trajectory") or {}).items() if self._trajectory().get(k) != v}
        if changed and self.rank == 0:
            log.warning("resuming from %s with other settings than it was trained with (%s): training continues, "
                        "but not along the batches the original run would have seen", path,
                        ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items()))
        state = self.app_state()
        restore_checkpoint(path, state)
        self.step, self.epoch, self.running, self.curve = read_progress(state["progress"])
        if self.rank == 0:
            log.info("resuming from checkpoint %s (step %d); train.resume=false starts afresh", path, self.step)

    def _build_modules(self) -> tuple:
        """The embedding modules (on meta) with their vocabs, and what needs the data to check."""
        cfg = self.cfg
        # Built from the parsed config: nothing is parsed twice.
        large = build(cfg.embeddings, self.parsed, allowed_targets=self.allowed_targets)
        if self.derived_small is not None:  # through the section's own `_target_`, which may be the user's
            derived = validate({"tables": self.derived_small}, section="small_embeddings", num_discrete_features=len(self.codes.columns))
            small = build(cfg.small_embeddings, replace(self.parsed, small_embeddings=derived.small_embeddings),
                          allowed_targets=self.allowed_targets, tables=self.derived_small)
        else:
            small = build(cfg.small_embeddings, self.parsed, allowed_targets=self.allowed_targets)
            top = {i: max(int(e.discrete[:, i].max()) for e in self.examples.values() if len(e)) for i in range(len(self.codes.columns))}
            derive.check_given_small_tables(small.tables, self.codes, top)
        for spec in large.specs:
            # A table with a vocab and its own num_embeddings: its rows still come from the vocab
            # (raw ids are meaningless as rows); the vocab must fit in num_embeddings.
            if spec.vocab and spec.name not in large.vocabs:
                large.vocabs[spec.name] = Vocab.load(
                    spec.vocab, table=spec.name, num_embeddings=spec.num_embeddings,
                    oov_policy=spec.oov_policy, oov_buckets=spec.oov_buckets, config_path=spec.path,
                )
        for spec in large.specs:
            if spec.name in large.vocabs:
                continue
            for feature in spec.feature_names:
                for split, examples in self.examples.items():
                    ids = examples.user_ids if feature == "user" else examples.item_ids
                    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= spec.num_embeddings):
                        raise ConfigError(
                            f"{spec.path}: has no vocab, so the raw ids of feature {feature!r} are its rows, but the "
                            f"{split} data has ids in [{int(ids.min())}, {int(ids.max())}], outside the table's "
                            f"{spec.num_embeddings} rows; allowed: ids in [0, {spec.num_embeddings}); set "
                            f"{spec.path}.vocab to a vocab directory (id -> row)"
                        )
        check_warm_start_vocabs(large.specs, large.vocabs)
        check_examples(self.examples, int(cfg.train.batch_size), list(small.tables), self._data_paths())
        return large, small

    def _data_paths(self) -> Dict[str, str]:
        data = self.cfg.data
        if data.source == DataSource.synthetic:
            return {"train": str(Path(data.dir) / "train.parquet"), "eval": str(Path(data.dir) / "eval.parquet")}
        return {"train": str(data.train_path), "eval": str(data.eval_path)}

    # ------------------------------------------------------------------ pieces

    def _to_rows(self, split: str, examples: Examples) -> Examples:
        """Raw ids to rows; the share of ids each table's vocab lacks (OOV) is logged per split."""
        vocabs = self.vocab.vocabs
        self.vocab.reset_counts()
        user = vocabs["user"].map(examples.user_ids) if "user" in vocabs else examples.user_ids
        item = vocabs["item"].map(examples.item_ids) if "item" in vocabs else examples.item_ids
        self.oov[split] = self.vocab.oov_rates()
        if self.rank == 0 and split != "train" and self.oov[split]:
            log.info("%s: ids not in the table's vocab (OOV): %s", split, ", ".join(f"{t} {r:.2%}" for t, r in self.oov[split].items()))
        return Examples(user, item, examples.discrete, examples.clicks)

    def _batch(self, batch: Batch) -> Batch:
        return batch.to(self.device)

    def evaluate(self, split: str = "eval") -> Dict[str, float]:
        """Metrics of the current model on a split: eval with its strata, validation overall only."""
        metrics = self.metrics if split == "eval" else self.validation_metrics
        self.model.eval()
        metrics.reset()
        with torch.no_grad():
            for raw in batches(self.examples[split], self.cfg.train.batch_size, rank=self.rank, world_size=self.world, drop_last=False):
                batch = self._batch(raw)
                logits = self.model(batch.sparse, batch.discrete)
                loss = self.loss_fn(logits, batch.labels)
                metrics.update(torch.sigmoid(logits), batch.labels.long(), batch.discrete, loss=loss)
        self.model.train()
        return {k: float(v) for k, v in metrics.compute().items()}

    def write_plan(self) -> str:
        rows = describe_plan(self.model)
        text = format_plan(rows)
        if self.rank == 0:
            save_plan_file(self.output_dir / "plan.json", plan_placements(self.model), world_size=self.world)
            atomic_write_text(self.output_dir / "plan.txt", text + "\n")
        return text

    # ------------------------------------------------------------------ loop

    def total_steps(self) -> int:
        cfg = self.cfg.train
        per_epoch = num_batches(len(self.examples["train"]), cfg.batch_size)
        return per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)

    def run(self) -> Dict[str, Any]:
        total = self.total_steps()
        if self.resume_from is not None and self.step >= total:
            done = final_metrics(self.output_dir, self.step)
            if done is not None:  # a rerun of a finished run: its results stand
                if self.rank == 0:
                    log.info("the run in %s already finished at step %d (metrics.json, %s); nothing to do "
                             "(train.resume=false trains afresh)", self.output_dir, self.step, done["checkpoint"])
                return done
        self.write_plan()  # `shard` has logged it
        with StopSignals() as stop:
            wall, step_time, stats = self._train_steps(total, stop)
        return self._finish(wall, step_time, stats)

    def _train_steps(self, total: int, stop: StopSignals) -> tuple:
        """Steps until `total`: checks each loss, saves periodic checkpoints, stops cleanly on a signal."""
        cfg = self.cfg.train
        train_set = self.examples["train"]
        per_epoch = num_batches(len(train_set), cfg.batch_size)
        agreement = StepAgreement(self.device)
        bar = _progress(total, enabled=cfg.progress and self.rank == 0)
        if "validation" not in self.examples and self.rank == 0:
            log.warning("data.validation_fraction=0: no validation split, so no early stopping and no keep-best; the curve is on the eval split")
        if bar is not None and self.step:
            bar.update(self.step)
        start = time.perf_counter()
        first = self.step
        step_time = 0.0
        stats: Dict[str, Any] = {}
        try:
            for epoch in range(self.step // max(per_epoch, 1), cfg.epochs):
                self.epoch = epoch
                skip = self.step - epoch * per_epoch  # batches of this epoch a resumed run already trained
                epoch_batches = batches(train_set, cfg.batch_size, rank=self.rank, world_size=self.world, shuffle_seed=cfg.seed * 1000 + epoch)
                for raw in itertools.islice(epoch_batches, max(skip, 0), None):
                    if self.step >= total:
                        break
                    t0 = time.perf_counter()
                    batch = self._batch(raw)
                    logits = self.model(batch.sparse, batch.discrete)
                    loss = self.loss_fn(logits, batch.labels).mean()
                    self.optimizer.zero_grad()
                    loss.backward()
                    value, signum = agreement.step(loss, stop.signum)
                    check_loss(value, self.step + 1, self._rates())  # before the update is kept anywhere
                    self.optimizer.step()
                    self.scheduler.step()
                    self.step += 1
                    step_time += time.perf_counter() - t0
                    self.running = value if self.running is None else 0.98 * self.running + 0.02 * value
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{self.running:.4f}", ex_s=f"{(self.step - first) * cfg.batch_size / (time.perf_counter() - start):,.0f}", refresh=False)
                    if cfg.log_every and self.step % cfg.log_every == 0:
                        stats = self._log_tables()
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._eval_point(self.running)
                        if "validation" in self.examples and self.keep_best.should_stop:
                            self.stopped_early = self.keep_best.stop_reason()
                    if signum is not None:
                        self._stop(signum)
                    if cfg.checkpoint and self.policy.due(self.step) and self.step < total and not self.stopped_early:
                        self.policy.save(self.step, self.app_state())
                    if self.stopped_early:
                        break
                if self.step >= total or self.stopped_early:
                    break
        finally:
            if bar is not None:
                bar.close()
        return time.perf_counter() - start, step_time, stats

    def _rates(self) -> Dict[str, float]:
        rates = {f"embeddings.tables.{k}": v for k, v in self.scheduler.get_last_lr().items()}
        rates["train.dense_optimizer.lr"] = float(self.cfg.train.dense_optimizer.lr)
        return rates

    def _stop(self, signum: int) -> None:
        """Every rank got here at the same step: save, then end the job with 128 + signum."""
        import signal as signals

        name = signals.Signals(signum).name
        if self.cfg.train.checkpoint:
            path = self.policy.save(self.step, self.app_state())
            raise StopRequested(f"stopped by {name} at step {self.step}: saved checkpoint {path}; run the same command "
                                f"again to resume (train.resume=false starts afresh)", signum)
        raise StopRequested(f"stopped by {name} at step {self.step}; train.checkpoint=false, so nothing was saved", signum)

    def _finish(self, wall: float, step_time: float, stats: Dict[str, Any]) -> Dict[str, Any]:
        """Final eval; metrics first, then the final checkpoint (the last step's weights), then the
        best step's eval (its checkpoint restored), writing the metrics each time."""
        cfg = self.cfg.train
        if not self.curve or self.curve[-1]["step"] != self.step:
            self._eval_point(self.running)  # the last step is a candidate for the best too
        if self.stopped_early and self.rank == 0:
            log.info("early stop at step %d: %s", self.step, self.stopped_early)
        stats = self._log_tables() or stats
        trained = max(1, self.step - (self._resumed_step or 0))
        final_eval = self.evaluate("eval")
        final = {"step": self.step, "validation": self._last_validation(), "eval": final_eval, "checkpoint": None}
        kb = self.keep_best
        best: Optional[Dict[str, Any]] = None
        if "validation" in self.examples and kb.best_step >= 0:
            best = {"step": kb.best_step, "validation": kb.best_metrics, "eval": final_eval if kb.best_step == self.step else None,
                    "checkpoint": str(kb.checkpoint) if kb.checkpoint else None}
        metrics = {
            "steps": self.step,
            "examples": self.step * cfg.batch_size,
            "world_size": self.world,
            "device": str(self.device),
            "threads": self.threads,
            "resumed_from": str(self.resume_from) if self.resume_from is not None else None,
            "train_seconds": wall,
            "seconds_per_step": step_time / trained,
            "examples_per_second": trained * cfg.batch_size / max(wall, 1e-9),
            "final_train_loss": self.running,
            "rows": {split: len(e) for split, e in self.examples.items()},
            # The model this run keeps: the best validation step's with keep-best, else the last
            # step's (set below, once the best step's eval is known).
            "eval": final_eval,
            "eval_auroc": final_eval["auroc"],
            "eval_loss": final_eval["loss"],
            # What a sweeper optimises: validation, never eval (None without a validation split).
            "validation_auroc": best["validation"].get("auroc") if best is not None else None,
            "best": best,
            "final": final,
            "stopped_early": self.stopped_early,
            "best_possible_eval_auroc": oracle_auroc(Path(self.cfg.data.dir)) if self.cfg.data.source == DataSource.synthetic else None,
            "curve": self.curve,
            "table_stats": stats,
            "oov_rate": self.oov.get("eval", {}),
            "oov_rate_by_split": self.oov,
            "unseen_discrete_rate": self.unseen,
            "pretrained": {k: str(v) for k, v in (self.pretrained or {}).items()},
            "embedding_dims": {s.name: s.embedding_dim for s in self.specs},
            "checkpoint": None,
        }
        if self.rank == 0:
            _write_json(self.output_dir / "metrics.json", metrics)  # a failed save below keeps these
        if cfg.checkpoint:
            metrics["checkpoint"] = final["checkpoint"] = str(self.policy.save(self.step, self.app_state(), final=True))
            if self.rank == 0:
                _write_json(self.output_dir / "metrics.json", metrics)
        if best is not None and best["eval"] is None and kb.checkpoint is not None:
            # The best step's weights, restored after the last step's were saved, scored on eval.
            restore_checkpoint(kb.checkpoint, {"model": self.model})
            best["eval"] = self.evaluate("eval")
        kept = best["eval"] if best is not None and best["eval"] is not None else final_eval
        metrics.update(eval=kept, eval_auroc=kept["auroc"], eval_loss=kept["loss"])
        if self.rank == 0:
            _write_json(self.output_dir / "metrics.json", metrics)
            if best is not None and best["eval"] is not None and best["step"] != self.step:
                log.info("eval of the best step %d (validation %s %.4f): %s", best["step"], kb.metric, kb.best_value, _fmt(best["eval"]))
                log.info("eval of the last step %d: %s", self.step, _fmt(final_eval))
            else:
                log.info("eval: %s", _fmt(kept))
            if metrics["best_possible_eval_auroc"] is not None:
                log.info("best possible eval auroc on this synthetic log: %.4f", metrics["best_possible_eval_auroc"])
        return metrics

    def _last_validation(self) -> Optional[Dict[str, float]]:
        last = self.curve[-1] if self.curve else {}
        if "validation_auroc" not in last:
            return None
        return {"auroc": last["validation_auroc"], "loss": last["validation_loss"]}

    def _eval_point(self, running: Optional[float]) -> None:
        """Evaluate on the validation split (on eval when there is none) for the curve; with a
        validation split, update keep-best and save the best checkpoint when it improved."""
        split = "validation" if "validation" in self.examples else "eval"
        result = self.evaluate(split)
        self.curve.append({"step": self.step, "train_loss": running, f"{split}_auroc": result["auroc"], f"{split}_loss": result["loss"]})
        improved = split == "validation" and self.keep_best.update(self.step, result)
        if self.rank == 0:
            mark = " (best)" if improved else ""
            log.info("step %d: %s auroc %.4f loss %.4f%s", self.step, split, result["auroc"], result["loss"], mark)
        if improved and self.cfg.train.keep_best:
            self.keep_best.save(self.output_dir / "checkpoints", self.step, self.app_state())

    def _log_tables(self) -> Dict[str, Any]:
        tables = [s.name for s in self.specs if s.key in self.cfg.embeddings.tables_to_log or s.name in self.cfg.embeddings.tables_to_log]
        if not tables:
            return {}
        stats = table_stats(self.model, tables)
        if self.rank == 0:
            log.info("step %d tables: %s", self.step, "; ".join(f"{t}: " + ", ".join(f"{k}={v:.4g}" for k, v in s.items()) for t, s in stats.items()))
        return stats


def _fmt(values: Dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in values.items())


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)


def _write_json(path: Path, payload: Dict[str, Any]) -> None:
    """Write atomically: a crash never leaves half a metrics file."""
    atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default, allow_nan=True) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def close_process_group() -> None:
    """Leave the process group together: every rank waits for the others, then destroys it.

    Left to interpreter exit, gloo's threads can be torn down while a peer still talks to them,
    and a rank that finished cleanly dies with SIGABRT ("terminate called without an active
    exception").
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train(cfg: DictConfig, output_dir: Path) -> Dict[str, Any]:
    """Build everything the config describes and train; returns the metrics (also in metrics.json)."""
    trainer = Trainer(cfg, output_dir)
    metrics = trainer.run()
    if trainer.owns_process_group:
        close_process_group()
    return metrics
