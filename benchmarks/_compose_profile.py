"""Where composing typed tables spends its time: a stack-sampling profile by activity, and micro-timings.

cProfile charges every Python call a fixed overhead, which inflates code made of many tiny calls
(OmegaConf's node handling is) and makes its fractions unreliable. So the fractions here come from
sampling: a thread looks at the main thread's stack every ~0.5 ms and charges the sample to the first
activity in `ACTIVITIES` found anywhere on the stack (so the activities are disjoint and add up to
the wall time). cProfile is still run once, for call counts and the function table.
"""

from __future__ import annotations

import copy
import cProfile
import gc
import pstats
import statistics
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

#: (activity, test on one stack frame's (file, function)); the first activity present on the stack wins.
ACTIVITIES: List[Tuple[str, Callable[[str, str], bool]]] = [
    ("build a typed node from its dataclass (OmegaConf get_dataclass_data)",
     lambda f, fn: fn in ("get_dataclass_data", "get_attr_data") and "omegaconf" in f),
    ("deep-copy config nodes", lambda f, fn: fn in ("deepcopy", "__deepcopy__") and ("copy.py" in f or "omegaconf" in f)),
    ("parse YAML", lambda f, fn: "/yaml/" in f),
    ("merge: set and validate values (OmegaConf _map_merge, rest)", lambda f, fn: fn == "_map_merge" and "omegaconf" in f),
    ("other OmegaConf (create, flags, interpolation checks)", lambda f, fn: "omegaconf" in f),
    ("Hydra (defaults list, search path, overrides)", lambda f, fn: "/hydra/" in f),
]
OTHER = "other (Python, imports)"

#: Overlapping views: the share of samples with this function anywhere on the stack.
INCLUSIVE: Dict[str, Callable[[str], bool]] = {
    "any deepcopy": lambda k: k.endswith((":deepcopy", ":__deepcopy__")),
    "get_dataclass_data": lambda k: k.endswith(":get_dataclass_data"),
    "OmegaConf _map_merge": lambda k: k.endswith("basecontainer.py:_map_merge"),
    "Hydra defaults list": lambda k: k.startswith("_internal/defaults_list.py"),
}


def _short(path: str) -> str:
    """`package/module.py` of a code path (built-ins have none)."""
    parts = path.rsplit("/", 2)
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def _frames(frame: Any) -> List[Tuple[str, str, Any]]:
    out = []
    while frame is not None:
        out.append((frame.f_code.co_filename, frame.f_code.co_name, frame))
        frame = frame.f_back
    return out  # innermost first


def _classify(frame: Any) -> Tuple[str, Optional[str]]:
    stack = _frames(frame)
    for name, test in ACTIVITIES:
        hits = [i for i, (f, fn, _) in enumerate(stack) if test(f, fn)]
        if not hits:
            continue
        detail = None
        if name.startswith("deep-copy"):
            # who asked for the copy: the frame just outside the outermost deepcopy
            outer = hits[-1] + 1
            if outer < len(stack):
                f, fn, _ = stack[outer]
                detail = f"{_short(f)}:{fn}"
        return name, detail
    return OTHER, None


def sampled(fn: Callable[[], Any], interval_s: float = 0.0005) -> Dict[str, Any]:
    """Run `fn` once while sampling its stack; seconds and share per activity."""
    main = threading.get_ident()
    counts: Counter = Counter()
    copies: Counter = Counter()
    inclusive: Counter = Counter()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            frame = sys._current_frames().get(main)
            if frame is not None:
                name, detail = _classify(frame)
                counts[name] += 1
                seen = {_short(f) + ":" + fn for f, fn, _ in _frames(frame)}
                for marker, test in INCLUSIVE.items():
                    if any(test(key) for key in seen):
                        inclusive[marker] += 1
                if detail:
                    copies[detail] += 1
            time.sleep(interval_s)

    gc_time = {"seconds": 0.0, "collections": 0, "t0": 0.0}

    def on_gc(phase: str, info: Dict[str, Any]) -> None:  # the collector's own time (samples cannot see it)
        if threading.get_ident() != main:
            return
        if phase == "start":
            gc_time["t0"] = time.perf_counter()
        else:
            gc_time["seconds"] += time.perf_counter() - gc_time["t0"]
            gc_time["collections"] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    thread = threading.Thread(target=sampler, daemon=True)
    gc.collect()
    tracked = len(gc.get_objects())
    gc.callbacks.append(on_gc)
    thread.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        thread.join()
        gc.callbacks.remove(on_gc)
        sys.setswitchinterval(old)
    total = sum(counts.values()) or 1
    return {
        "wall_seconds": wall,
        "samples": total,
        "share": {name: counts[name] / total for name, _ in [*ACTIVITIES, (OTHER, None)] if counts[name]},
        "seconds": {name: wall * counts[name] / total for name, _ in [*ACTIVITIES, (OTHER, None)] if counts[name]},
        "deepcopy_share_by_caller": {k: v / total for k, v in copies.most_common(8)},
        "inclusive_share": {k: inclusive[k] / total for k in INCLUSIVE},
        "gc_seconds": gc_time["seconds"],
        "gc_collections": gc_time["collections"],
        "objects_tracked_by_gc_before": tracked,
    }


def profiled(fn: Callable[[], Any], top: int = 15) -> Dict[str, Any]:
    """cProfile of one call: total, call counts of the functions that matter, top functions by own time."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    st = pstats.Stats(prof)
    total = st.total_tt
    rows = []
    for (path, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{_short(path)}:{func}", "ncalls": nc, "primitive_calls": cc,
                     "tottime_s": tt, "cumtime_s": ct})
    by_tot = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    watched = ("get_dataclass_data", "_map_merge", "merge_with", "__deepcopy__", "deepcopy", "_set_item_impl", "load", "create_defaults_list")
    calls = {r["function"]: {"ncalls": r["ncalls"], "primitive_calls": r["primitive_calls"], "cumtime_s": r["cumtime_s"]}
             for r in rows if r["function"].rsplit(":", 1)[-1] in watched and r["cumtime_s"] > 0.01 * total}
    return {"profiled_total_s": total, "top_by_own_time": by_tot, "watched_calls": calls}


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _count_nodes(node: Any) -> int:
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        return 1 + sum(_count_nodes(node._get_node(k)) for k in node.keys())
    if isinstance(node, ListConfig):
        return 1 + sum(_count_nodes(node._get_node(i)) for i in range(len(node)))
    return 1


def table_node_costs(table_cls: type, collection_cls: type, reps: int = 200) -> Dict[str, Any]:
    """One typed table, step by step as OmegaConf's merge adds it to a ``Dict[str, <table>]`` node.

    For a key it does not have yet, ``_map_merge`` builds ``DictConfig(<table dataclass>)``, assigns
    it (``__setitem__`` deep-copies a node it is given) and merges the YAML values into it. The
    open-mapping rows do the same for the table as YAML writes it (one field).
    """
    from omegaconf import DictConfig, OmegaConf

    collection = OmegaConf.structured(collection_cls)
    tables = collection._get_node("tables")
    proto = DictConfig(table_cls, parent=tables, ref_type=table_cls)
    yaml_table = OmegaConf.create({"num_embeddings": 1000})
    nodes = _count_nodes(proto)
    counter = iter(range(10 ** 9))

    def build() -> Any:
        return DictConfig(table_cls, parent=tables, ref_type=table_cls)

    def assign() -> None:
        tables[f"k{next(counter)}"] = proto  # deep-copies `proto`

    def merge_values() -> None:
        node = copy.deepcopy(proto)
        node._set_parent(tables)
        node._merge_with(yaml_table)

    batch = 20
    many = OmegaConf.create({"tables": {f"t{i}": {"num_embeddings": 1000 + i} for i in range(batch)}})
    none = OmegaConf.create({"tables": {}})

    def marginal(dest: Any) -> float:
        """Per table: merging `batch` YAML tables into `dest` minus merging none, over `batch`."""
        full = _median_time(lambda: OmegaConf.merge(dest, many), max(reps // 20, 5))
        empty = _median_time(lambda: OmegaConf.merge(dest, none), max(reps // 20, 5))
        return (full - empty) / batch

    out = {
        "typed_table_nodes": nodes,
        "build_typed_table_ms": 1e3 * _median_time(build, reps),
        "deepcopy_typed_table_ms": 1e3 * _median_time(lambda: copy.deepcopy(proto), reps),
        "assign_typed_table_ms (deepcopy inside)": 1e3 * _median_time(assign, reps),
        "merge_yaml_values_into_typed_table_ms (incl. a deepcopy)": 1e3 * _median_time(merge_values, reps),
        "merge_per_table_into_typed_collection_ms": 1e3 * marginal(collection),
        "merge_per_table_into_open_mapping_ms": 1e3 * marginal(OmegaConf.create({"tables": {}})),
        "open_table_nodes": _count_nodes(yaml_table),
    }
    out["build_per_node_us"] = 1e3 * out["build_typed_table_ms"] / nodes
    out["deepcopy_per_node_us"] = 1e3 * out["deepcopy_typed_table_ms"] / nodes
    return out
