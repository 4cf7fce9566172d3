"""The training loop of `recap-embed-train`, usable without Hydra: `train(cfg, output_dir)`.

`Trainer` puts a run together in order (checks, run dir, data, derived sections, modules, sharding,
pretrained weights, optimizers, a resume) and then steps: `train_step` is the one training step,
`run` the loop around it (evaluation, keep-best, checkpoints, a clean stop on a signal) and the
finish (metrics.json, the final checkpoint, the best step's eval). What each stage does lives in
its own module (`preflight`, `splits`, `derive`, `components`, `resume`, `results`); this one
holds the order and the agreements between ranks.

Every rank runs it; files are written by rank 0 only (the checkpoint by all ranks together).
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from recap_embed.distributed import describe_plan, format_plan, plan_placements, resolve_device, save_plan_file, shard
from recap_embed.distributed.collectives import all_ranks, is_initialized, join_process_group, leave_process_group, rank_and_world
from recap_embed.files import atomic_write_text
from recap_embed.hydra_guards import app_allowed_targets
from recap_embed.io.checkpoint import restore_checkpoint
from recap_embed.io.pretrained import load_pretrained
from recap_embed.io.vocab_mapper import VocabMapper
from recap_embed.modules import table_stats

from . import derive
from .components import build_embeddings, build_metrics, build_optimizer, rows_of_split
from .config import DataSource
from .data import Batch, Examples, batches, generate_synthetic, num_batches
from .fingerprint import read_checkpoint_info, vocab_fingerprint
from .guards import check_loss, check_output_dir, check_weights_finite
from .keep_best import KeepBest
from .model import RecapModel
from .own_data import DiscreteCodes
from .preflight import SPARSE_FEATURES, apply_threads, build_vocab_paths, preflight
from .results import best_record, last_validation, log_evals, metrics_record, write_json
from .resume import (
    CheckpointPolicy, RunDirLock, check_resumable, final_metrics, materialize_dense_state, progress_state, read_progress,
    resume_point, supersede,
)
from .splits import read_splits
from .stop import StepAgreement, StopRequested, StopSignals

__all__ = ["Trainer", "train", "prepare_data", "preflight", "apply_threads", "build_vocab_paths", "SPARSE_FEATURES"]

log = logging.getLogger("recap_embed.train")


def prepare_data(cfg: DictConfig, rank: int) -> Tuple[Dict[str, Examples], DiscreteCodes, Dict[str, Dict[str, float]]]:
    """Generate the synthetic log (rank 0, once) when the config asks for it, then `splits.read_splits`."""
    data = cfg.data
    if data.source == DataSource.synthetic:
        # The agreement is the barrier; a failure on rank 0 stops every rank.
        all_ranks(lambda: generate_synthetic(Path(data.dir), data.synthetic, data.seed) if rank == 0 else None)
    return read_splits(cfg, rank)


class Trainer:
    """Builds the model from the config and runs the loop; see `train` for the one-call form."""

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.device = resolve_device(cfg.sharding.device)
        # The group is ours to close when torchrun's ranks join it here, or `shard` makes one.
        self.owns_process_group = not is_initialized()
        join_process_group(self.device.type)
        self.rank, self.world = rank_and_world()
        self.threads, self.built_vocabs, self.parsed = all_ranks(self._preflight)
        self.allowed_targets = app_allowed_targets(cfg)
        # One run per run dir; a rerun continues from its latest checkpoint (or starts afresh).
        self.lock = RunDirLock(self.output_dir)
        all_ranks(self._claim_run_dir)
        self.resume_from = resume_point(self.output_dir, bool(cfg.train.resume)) if cfg.train.checkpoint else None
        torch.manual_seed(cfg.train.seed)
        self.examples, self.codes, self.unseen = all_ranks(prepare_data, cfg, self.rank)
        self.derived_small, self.derived_strata = all_ranks(
            derive.derive_from_training, cfg, self.codes, self.examples["train"], self.built_vocabs, self.output_dir, self.rank)
        large, small = all_ranks(build_embeddings, cfg, self.parsed, self.allowed_targets, self.derived_small, self.codes, self.examples)
        self.vocab = VocabMapper({f: large.vocabs[s.name] for s in large.specs if s.name in large.vocabs for f in s.feature_names})
        # Raw ids become rows once per split, so the step does not pay for it.
        self.oov: Dict[str, Dict[str, float]] = {}
        for split in list(self.examples):
            self.examples[split], self.oov[split] = rows_of_split(self.vocab, split, self.examples[split], self.rank)
        self.vocab_fingerprints = {s.name: (vocab_fingerprint(large.vocabs[s.name]) if s.name in large.vocabs else None) for s in large.specs}
        model = RecapModel(large, small, list(cfg.model.hidden), cfg.model.interaction)
        self.model = shard(model, self.parsed, device=self.device)
        self.specs = large.specs
        # Rows stream straight into the weights (no staging copy: 1.8x faster, +0.07x memory instead
        # of +1.07x). The weights are fresh initialisation, so an I/O error mid-table loses nothing:
        # the job stops, and the snapshot was checked (manifest, names, shapes, sizes) beforehand.
        self.pretrained = load_pretrained(self.model, self.specs, staging=False)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.train.dense_optimizer)
        self.metrics, self.validation_metrics = build_metrics(
            cfg, self.parsed, self.allowed_targets, self.derived_strata, self.codes, self.rank, self.device)
        self.loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
        self.agreement = StepAgreement(self.device)
        self.step = 0
        self.epoch = 0
        self.running: Optional[float] = None
        self.curve: List[Dict[str, float]] = []
        self.keep_best = KeepBest.from_config(cfg.train)
        self.stopped_early: Optional[str] = None
        self.policy = CheckpointPolicy(
            self.output_dir / "checkpoints", every=int(cfg.train.checkpoint_every), keep=int(cfg.train.keep_checkpoints),
            asynchronous=bool(cfg.train.checkpoint_async), rank=self.rank, info=self._checkpoint_info,
        )
        self._resumed_step: Optional[int] = None
        if self.resume_from is not None:
            self._resume(self.resume_from)
            self._resumed_step = self.step

    # ------------------------------------------------------------------ set-up

    def _preflight(self) -> tuple:
        """Threads, the vocabs the app will build, then `preflight`: nothing read or built yet.
        Returns the threads, the specs of the tables whose vocab is built ({key: spec}), the parsed config."""
        threads = apply_threads(self.cfg.train.threads)
        planned = build_vocab_paths(self.cfg, self.output_dir)
        parsed = preflight(self.cfg, self.device, self.world)
        assert parsed.embeddings is not None
        return threads, {s.key: s for s in parsed.embeddings.tables if s.key in planned}, parsed

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
        check_resumable(path, read_checkpoint_info(str(path)) or {}, self.vocab_fingerprints, self._trajectory(), self.rank)
        materialize_dense_state(self.optimizer)
        state = self.app_state()
        restore_checkpoint(path, state)
        self.step, self.epoch, self.running, self.curve = read_progress(state["progress"])
        if self.rank == 0:
            log.info("resuming from checkpoint %s (step %d); train.resume=false starts afresh", path, self.step)

    # ------------------------------------------------------------------ pieces

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

    def train_step(self, batch: Batch, signum: Optional[int] = None) -> Tuple[float, Optional[int]]:
        """One training step on `batch` (as `data.batches` yields it; moved to the device here):
        forward, loss, backward, the step agreement (the loss averaged over the ranks, and the stop
        signal any rank received: `signum` is this rank's), the loss check (a nan loss stops the run
        before the update is kept), then the optimizer and the scheduler step; counts the step.

        Returns (the mean loss over the ranks, the agreed signal or None). `run` takes every step
        through here, and so does `benchmarks/bench_train_app.py`.
        """
        batch = self._batch(batch)
        logits = self.model(batch.sparse, batch.discrete)
        loss = self.loss_fn(logits, batch.labels).mean()
        self.optimizer.zero_grad()
        loss.backward()
        value, signum = self.agreement.step(loss, signum)
        check_loss(value, self.step + 1, self._rates)  # before the update is kept anywhere
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return value, signum

    def _train_steps(self, total: int, stop: StopSignals) -> tuple:
        """Steps until `total`: checks each loss, saves periodic checkpoints, stops cleanly on a signal."""
        cfg = self.cfg.train
        train_set = self.examples["train"]
        per_epoch = num_batches(len(train_set), cfg.batch_size)
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
                    value, signum = self.train_step(raw, stop.signum)
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
            self.keep_best.save(self.output_dir / "checkpoints", self.step, self.app_state(), write_extra=self.policy.write_info)

    def _log_tables(self) -> Dict[str, Any]:
        tables = [s.name for s in self.specs if s.key in self.cfg.embeddings.tables_to_log or s.name in self.cfg.embeddings.tables_to_log]
        if not tables:
            return {}
        stats = table_stats(self.model, tables)
        if self.rank == 0:
            log.info("step %d tables: %s", self.step, "; ".join(f"{t}: " + ", ".join(f"{k}={v:.4g}" for k, v in s.items()) for t, s in stats.items()))
        return stats

    # ------------------------------------------------------------------ finish

    def _finish(self, wall: float, step_time: float, stats: Dict[str, Any]) -> Dict[str, Any]:
        """Final eval; metrics first, then the final checkpoint (the last step's weights), then the
        best step's eval (its checkpoint restored), writing the metrics each time."""
        if not self.curve or self.curve[-1]["step"] != self.step:
            self._eval_point(self.running)  # the last step is a candidate for the best too
        if self.stopped_early and self.rank == 0:
            log.info("early stop at step %d: %s", self.step, self.stopped_early)
        stats = self._log_tables() or stats
        trained = max(1, self.step - (self._resumed_step or 0))
        final_eval = self.evaluate("eval")
        final = {"step": self.step, "validation": last_validation(self.curve), "eval": final_eval, "checkpoint": None}
        best = best_record(self.keep_best, "validation" in self.examples, final_eval, self.step)
        metrics = metrics_record(self, wall=wall, step_time=step_time, trained=trained, stats=stats, final=final, best=best)
        if self.rank == 0:
            write_json(self.output_dir / "metrics.json", metrics)  # a failed save below keeps these
        if self.cfg.train.checkpoint:
            metrics["checkpoint"] = final["checkpoint"] = str(self.policy.save(self.step, self.app_state(), final=True))
            if self.rank == 0:
                write_json(self.output_dir / "metrics.json", metrics)
        if best is not None and best["eval"] is None and self.keep_best.checkpoint is not None:
            # The best step's weights, restored after the last step's were saved, scored on eval.
            restore_checkpoint(self.keep_best.checkpoint, {"model": self.model})
            best["eval"] = self.evaluate("eval")
        kept = best["eval"] if best is not None and best["eval"] is not None else final_eval
        metrics.update(eval=kept, eval_auroc=kept["auroc"], eval_loss=kept["loss"])
        if self.rank == 0:
            write_json(self.output_dir / "metrics.json", metrics)
            log_evals(metrics, self.keep_best)
        return metrics


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)


def train(cfg: DictConfig, output_dir: Path) -> Dict[str, Any]:
    """Build everything the config describes and train; returns the metrics (also in metrics.json)."""
    trainer = Trainer(cfg, output_dir)
    metrics = trainer.run()
    if trainer.owns_process_group:
        leave_process_group()
    return metrics
