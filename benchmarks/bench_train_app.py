"""The training app's step end to end vs. the bare model step: what the input pipeline costs.

Everything is built by the app's own code: the app config composed with Hydra's compose API
(``recap_embed_train`` through recap_embed's search-path plugin; ``sharding=cpu``,
``train.checkpoint=false``, ``train.eval_every=0``), then ``recap_embed.train.loop.Trainer``
(synthetic click log, vocabs, model, ``shard``, optimizers, scheduler). Steps are interleaved:

* ``app``: one iteration of ``Trainer.run``'s loop body: the next batch from
  ``recap_embed.train.data.batches`` (a slice of the split's rows + KJT), then
  ``Trainer.train_step``, the very step the loop takes (``.to(device)``, forward, loss,
  ``zero_grad``, backward, the step agreement (the loss as a float), the loss check,
  ``optimizer.step()``, ``scheduler.step()``), then the loop's bookkeeping: the running loss,
  the progress bar (tqdm into a null file, as ``run`` does it) and the ``log_every`` check;
* ``bare``: forward, loss, ``zero_grad``, backward, ``optimizer.step()`` on batches that were
  built and vocab-mapped beforehand (stored as tensors; a fresh KeyedJaggedTensor per step,
  because torchrec caches offsets on a KJT and a reused one would skip work): the model step
  alone, the reference the app's extra work is measured against;
* ``what_if_batches_ready`` (not the app's loop): ``Trainer.train_step`` and the bookkeeping on
  batches built ahead of time (each used once), as a perfect prefetcher would hand them over.

overhead = (app - bare) / app, medians (target <= 10%). A per-phase breakdown of the app step
follows (the calls of ``Trainer.train_step`` timed one by one, in its order), and a cross-check:
``Trainer.run()`` itself for ``--run-steps`` steps (its wall time per step, eval at the end
excluded), against the bare median. If ``Trainer`` cannot be built (the app is work in
progress), the JSON records the error and the benchmark stops.

    python benchmarks/bench_train_app.py --out benchmarks/results/train_app.json
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, interleaved, machine, parser, set_threads, summary, write_json  # noqa: E402


def compose_app(data_dir: Path, overrides: List[str]) -> Any:
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra

    import recap_embed.train.config  # noqa: F401  (the app's schema)

    GlobalHydra.instance().clear()
    with initialize(version_base=None):
        return compose(
            config_name="recap_embed_train",
            overrides=[f"data.dir={data_dir}", "sharding=cpu", "train.checkpoint=false", "train.eval_every=0",
                       "train.threads=null", *overrides],  # keep the threads set_threads chose
        )


class Arms:
    """The timed arms over one built `Trainer`; the loop's bookkeeping (running loss, bar) is shared."""

    def __init__(self, trainer: Any, reps: int) -> None:
        from tqdm import tqdm

        from recap_embed.train.data import batches

        self.trainer, self.batches = trainer, batches
        self.tcfg = trainer.cfg.train
        self.train_set = trainer.examples["train"]
        self.state: Dict[str, Any] = {"gen": None, "epoch": 0, "running": None, "step": 0, "start": time.perf_counter()}
        self.null = open(os.devnull, "w")  # noqa: SIM115
        self.bar = tqdm(total=10**9, file=self.null, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
        # Pre-built, vocab-mapped batches for the bare arm, kept as tensors: a fresh KeyedJaggedTensor
        # is made per step (torchrec caches offsets etc. on a KJT, so a reused one would skip work).
        self.prebuilt = []
        for raw in batches(self.train_set, self.tcfg.batch_size, shuffle_seed=12345):
            b = trainer._batch(raw)
            self.prebuilt.append((b.sparse.keys(), b.sparse.values(), b.sparse.lengths(), b.discrete, b.labels))
            if len(self.prebuilt) == 32:
                break
        self.bare_i = 0
        # What-if (not the app's loop): batches built ahead of time (each used once), as a perfect
        # prefetcher would hand them over; the step and the bookkeeping are unchanged.
        self.ready: List[Any] = []
        for epoch in range(100, 10**6):
            for raw in batches(self.train_set, self.tcfg.batch_size, shuffle_seed=epoch):
                self.ready.append(trainer._batch(raw))
                if len(self.ready) >= reps + 3:
                    break
            if len(self.ready) >= reps + 3:
                break

    def next_raw(self) -> Any:
        state = self.state
        while True:
            if state["gen"] is None:
                state["gen"] = self.batches(self.train_set, self.tcfg.batch_size, rank=self.trainer.rank, world_size=self.trainer.world,
                                            shuffle_seed=self.tcfg.seed * 1000 + state["epoch"])
                state["epoch"] += 1
            try:
                return next(state["gen"])
            except StopIteration:
                state["gen"] = None

    def app(self) -> None:
        """`Trainer.run`'s loop body: the next batch, `Trainer.train_step`, the bookkeeping."""
        value, _ = self.trainer.train_step(self.next_raw())
        state, tcfg = self.state, self.tcfg
        state["step"] += 1
        state["running"] = value if state["running"] is None else 0.98 * state["running"] + 0.02 * value
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{state['running']:.4f}",
                             ex_s=f"{state['step'] * tcfg.batch_size / (time.perf_counter() - state['start']):,.0f}", refresh=False)
        if tcfg.log_every and state["step"] % tcfg.log_every == 0:
            pass  # table statistics: measured on their own (amortised over log_every steps)

    def bare(self) -> None:
        """The model step alone, on batches built beforehand: the reference."""
        from torchrec import KeyedJaggedTensor

        from recap_embed.train.data import Batch

        t = self.trainer
        keys, values, lengths, discrete, labels = self.prebuilt[self.bare_i % len(self.prebuilt)]
        self.bare_i += 1
        batch = Batch(KeyedJaggedTensor(keys=keys, values=values, lengths=lengths), discrete, labels)
        logits = t.model(batch.sparse, batch.discrete)
        loss = t.loss_fn(logits, batch.labels).mean()
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()

    def what_if_batches_ready(self) -> None:
        value, _ = self.trainer.train_step(self.ready.pop())
        self.state["running"] = 0.98 * (self.state["running"] or value) + 0.02 * value
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.state['running']:.4f}", ex_s="0", refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.null.close()


#: `Trainer.train_step`'s calls in its order (the agreement and the loss check are what it adds to
#: the bare step), between the next batch and the loop's bookkeeping.
PHASES = ("next_batch", "vocab_map_and_to", "forward_loss", "zero_grad_backward", "loss_agreement_check", "optimizer_step",
          "scheduler_step", "bookkeeping")


def phase_breakdown(arms: Arms, rounds: int) -> Tuple[Dict[str, float], float]:
    """Median ms of each phase of the app step, timed one by one, and of the whole timed-apart step
    (compare with the app median: the breakdown must account for the step)."""
    from recap_embed.train.guards import check_loss

    t_ = arms.trainer
    model, loss_fn, opt, sched = t_.model, t_.loss_fn, t_.optimizer, t_.scheduler
    phases: Dict[str, List[float]] = {k: [] for k in PHASES}
    totals: List[float] = []
    for _ in range(rounds):
        t = [time.perf_counter()]
        raw = arms.next_raw(); t.append(time.perf_counter())  # noqa: E702
        batch = t_._batch(raw); t.append(time.perf_counter())  # noqa: E702
        loss = loss_fn(model(batch.sparse, batch.discrete), batch.labels).mean(); t.append(time.perf_counter())  # noqa: E702
        opt.zero_grad(); loss.backward(); t.append(time.perf_counter())  # noqa: E702
        value, _ = t_.agreement.step(loss, None)
        check_loss(value, t_.step + 1, t_._rates); t.append(time.perf_counter())  # noqa: E702
        opt.step(); t.append(time.perf_counter())  # noqa: E702
        sched.step(); t.append(time.perf_counter())  # noqa: E702
        t_.step += 1
        arms.bar.update(1)
        arms.bar.set_postfix(loss=f"{value:.4f}", ex_s="0", refresh=False)
        t.append(time.perf_counter())
        for k, a, b in zip(phases, t, t[1:]):
            phases[k].append(b - a)
        totals.append(t[-1] - t[0])
    return {k: 1e3 * summary(v)["median"] for k, v in phases.items()}, 1e3 * summary(totals)["median"]


def run_check(trainer: Any, run_steps: int, bare_median: float) -> Dict[str, Any]:
    """Cross-check: `Trainer.run()` itself for `run_steps` steps, its wall time per step vs. the bare median."""
    try:
        trainer.cfg.train.max_steps = run_steps
        trainer.step = 0
        with contextlib.redirect_stderr(io.StringIO()):
            metrics = trainer.run()
        per_step = metrics["train_seconds"] / max(1, metrics["steps"])
        return {"steps": metrics["steps"], "wall_seconds_per_step": per_step,
                "loop_timer_seconds_per_step": metrics.get("seconds_per_step"),
                "overhead_vs_bare_median": (per_step - bare_median) / per_step}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def measure(trainer: Any, reps: int, run_steps: int) -> Dict[str, Any]:
    """Every figure of the JSON past `setup`, printed as the benchmark goes."""
    arms = Arms(trainer, reps)
    times = interleaved({"app": arms.app, "bare": arms.bare, "what_if_batches_ready": arms.what_if_batches_ready}, reps=reps, warmup=3)
    med = {k: summary(v)["median"] for k, v in times.items()}
    paired = summary([(a - b) / a for a, b in zip(times["app"], times["bare"])])["median"]
    phase_ms, phase_total_ms = phase_breakdown(arms, max(5, reps // 2))
    log_ms = None
    if trainer.cfg.embeddings.tables_to_log:
        t0 = time.perf_counter()
        trainer._log_tables()
        log_ms = 1e3 * (time.perf_counter() - t0)
    check = run_check(trainer, run_steps, med["bare"])
    arms.close()
    overhead = (med["app"] - med["bare"]) / med["app"]
    ready_overhead = (med["what_if_batches_ready"] - med["bare"]) / med["what_if_batches_ready"]
    log_every = trainer.cfg.train.log_every
    print(f"app {med['app'] * 1e3:.2f} ms, bare {med['bare'] * 1e3:.2f} ms: input pipeline + bookkeeping = "
          f"{100 * overhead:.1f}% of the step (paired {100 * paired:.1f}%)")
    print(f"what-if batches ready: {med['what_if_batches_ready'] * 1e3:.2f} ms, overhead {100 * ready_overhead:.1f}%")
    print("app phases (ms):", {k: round(v, 3) for k, v in phase_ms.items()}, f"total {phase_total_ms:.3f}")
    print("Trainer.run check:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in check.items()})
    return {
        "ms": {k: {kk: (vv * 1e3 if kk != "n" else vv) for kk, vv in summary(v).items()} for k, v in times.items()},
        "overhead_fraction": overhead,
        "overhead_fraction_paired": paired,
        "what_if_batches_ready_overhead_fraction": ready_overhead,
        "app_phases_ms": phase_ms,
        "app_phases_total_ms": phase_total_ms,
        "table_stats_log_ms_once": log_ms,
        "table_stats_amortised_fraction": (log_ms / 1e3 / log_every / med["app"]) if (log_ms and log_every) else None,
        "trainer_run_check": check,
        "targets": {"overhead_le_10pct": overhead <= 0.10},
    }


def main() -> None:
    p = parser(__doc__.split("\n\n")[0], threads=True)
    p.add_argument("--reps", type=int, default=200, help="timed steps per arm (interleaved)")
    p.add_argument("--run-steps", type=int, default=300, help="steps of the Trainer.run cross-check")
    p.add_argument("--override", action="append", default=[], help="extra app config overrides")
    args = p.parse_args()
    threads = set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    overrides = list(args.override)
    reps, run_steps = args.reps, args.run_steps
    if args.quick:
        reps, run_steps = 5, 5
        overrides += ["data.synthetic.num_train=20000", "data.synthetic.num_eval=2000", "data.synthetic.num_users=1000",
                      "data.synthetic.num_items=300"]

    from omegaconf import OmegaConf

    loop_src = ROOT / "recap_embed" / "train" / "loop.py"
    result: Dict[str, Any] = {
        "benchmark": "train_app",
        "machine": {**machine(), "torch_threads": threads},
        "quick": args.quick,
        "setup": {"reps": reps, "run_steps": run_steps, "overrides": overrides,
                  "loop_py_sha1": hashlib.sha1(loop_src.read_bytes()).hexdigest()[:12] if loop_src.exists() else None},
    }
    tmp = Path(tempfile.mkdtemp(prefix="recap_bench_app_"))
    try:
        cfg = compose_app(tmp / "data", overrides)
        try:
            from recap_embed.train.loop import Trainer

            with contextlib.redirect_stderr(io.StringIO()):
                trainer = Trainer(cfg, tmp / "out")
        except Exception as e:  # noqa: BLE001 - the app is work in progress: record why
            result["error"] = f"Trainer could not be built: {type(e).__name__}: {e}"
            result["targets"] = {"overhead_le_10pct": None}
            print(result["error"])
            write_json(args.out, result)
            return
        result["setup"].update({
            "batch_size": int(cfg.train.batch_size), "tables": {s.name: [int(s.num_embeddings), s.embedding_dim] for s in trainer.specs},
            "train_examples": len(trainer.examples["train"]), "device": str(trainer.device),
            "config": OmegaConf.to_container(cfg.embeddings.optimizer, resolve=True),
        })
        result.update(measure(trainer, reps, run_steps))
        write_json(args.out, result)
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
