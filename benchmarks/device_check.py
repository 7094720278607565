"""GPU device check: every paper-scale config's bf16 training step, the hash encoding against the bandwidth bound
(and tiny-cuda-nn where it imports), KNN retrieval on the GPU against faiss on the CPU, and the CUDA-only tests.

Run through ``bash benchmarks/device_check.sh`` (which sets up the Python path and any carried wheels); the whole
check keeps to ``--budget-s`` seconds (default 440, so that with the wrapper's set-up it fits in 8 minutes). Every
step runs in its own process with its own time cap, so one failing or hanging step does not stop the others:

* ``tests``: the tests that skip without CUDA (``skipif`` on ``torch.cuda.is_available()`` or the ``gpu`` mark),
  found by reading ``tests/`` and run with pytest;
* ``hash``: :class:`~terratorch_eoplugins.nn.hash_encoding.HashGridEncoding2D` (its default, paper-size levels and
  features) forward and forward + backward throughput in point-levels/s, against the bound that the measured
  device-to-device copy bandwidth sets for the forward gathers (4 corners x F values read per point-level; about
  1.6e9 point-levels/s at F = 128 on an H100's HBM) and against tiny-cuda-nn's hash grid where ``tinycudann``
  imports (or installs); then ``benchmarks/hash_encoding.py --device cuda`` (lean vs naive, side by side);
* ``knn``: :class:`~terratorch_eoplugins.nn.knn.KNNDatabase` exact cosine top-k on the GPU against faiss
  ``IndexFlatIP`` on every CPU core, same data (queries/s, ratio, neighbour agreement), then
  ``benchmarks/knn_retrieval.py`` (its own CPU comparison; ``--device cuda`` when it offers one);
* ``train``: every top-level config ``configs/{lianet,dunia,s4,tsfusion}_*.yaml``, built through terratorch's CLI
  machinery in-process with its data pointed at a tiny synthetic world (written in the background while the other
  steps run, unless ``--world`` names one), trained for a few steps with ``--trainer.precision bf16-mixed`` on the
  GPU: median step time, samples/s, ``torch.cuda.max_memory_allocated`` and the model's parameter count, read
  from the built model (sizes are never assumed here).

``--dry-run`` (no GPU needed, used by the test suite) prints the plan and runs each step's argument parsing and a
tiny CPU version of its measurement code. Results are printed as a summary and written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
STEPS = ("tests", "hash", "knn", "train")
#: top-level configs of the four models (configs/<model>_<task>.yaml)
DEFAULT_CONFIGS = ("lianet_*.yaml", "dunia_*.yaml", "s4_*.yaml", "tsfusion_*.yaml")
#: the forward-gather bound quoted for H100-class HBM (3.35 TB/s / (4 corners x 128 features x 4 bytes))
H100_REFERENCE_POINT_LEVELS = 1.6e9
RESULT = "@@RESULT "
START = "@@START "
DEFAULT_CAPS = {"tests": 60.0, "hash": 75.0, "knn": 75.0}


def _log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- process guard
class _Child:
    """A child process in its own process group whose stdout lines are read by a thread (so reads can time out)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next line; ``None`` at the end of the output; raises ``TimeoutError`` past ``deadline``."""
        try:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise TimeoutError from None
        if line is not None:
            self.tail = [*self.tail[-30:], line]
        return line

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p)
    return env


def run_guarded(name: str, argv: list[str], cap_s: float, echo: bool = True) -> list[dict[str, Any]]:
    """Run ``argv`` for at most ``cap_s`` seconds, echo its output, return its ``@@RESULT`` records.

    A timeout or a non-zero exit adds a record ``{"step": name, "status": "timeout" | "error", ...}``.
    """
    t0 = time.monotonic()
    child = _Child(argv, _child_env())
    results: list[dict[str, Any]] = []
    deadline = t0 + cap_s
    try:
        while True:
            line = child.next_line(deadline)
            if line is None:
                break
            if line.startswith(RESULT):
                results.append(json.loads(line[len(RESULT):]))
            elif echo:
                _log(f"  [{name}] {line}")
    except TimeoutError:
        child.kill()
        results.append({"step": name, "status": "timeout", "cap_s": round(cap_s, 1)})
        _log(f"  [{name}] stopped at its time cap ({cap_s:.0f} s)")
        return results
    rc = child.proc.wait()
    if rc != 0:
        results.append({"step": name, "status": "error", "returncode": rc, "tail": "\n".join(child.tail[-12:])})
    return results


def _emit(record: dict[str, Any]) -> None:
    print(RESULT + json.dumps(record), flush=True)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` timed calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------- tests
def cuda_only_tests(root: Path = REPO / "tests", base: Path = REPO) -> list[str]:
    """Node ids (``path::function`` / ``path::Class::method``, relative to ``base``) of the tests that skip without
    CUDA.

    A test counts when a decorator (or the module's ``pytestmark``) is a ``skipif`` whose condition mentions
    ``cuda``, or the ``gpu`` mark.
    """

    def marks_cuda(node: ast.expr) -> bool:
        src = ast.unparse(node)
        return ("skipif" in src and "cuda" in src) or re.search(r"\bmark\.gpu\b", src) is not None

    ids = []
    for path in sorted(root.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(base).as_posix()
        module_marked = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                            and marks_cuda(n.value) for n in tree.body)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
                if module_marked or any(marks_cuda(d) for d in node.decorator_list):
                    ids.append(f"{rel}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                class_marked = module_marked or any(marks_cuda(d) for d in node.decorator_list)
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef) and sub.name.startswith("test") and (
                            class_marked or any(marks_cuda(d) for d in sub.decorator_list)):
                        ids.append(f"{rel}::{node.name}::{sub.name}")
    return ids


def step_tests(args: argparse.Namespace) -> None:
    ids = cuda_only_tests()
    _log(f"CUDA-only tests ({len(ids)}): {' '.join(ids) or 'none found'}")
    if not ids:
        _emit({"step": "tests", "status": "ok", "tests": 0})
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *ids]
    if args.dry_run:  # the node ids were read from the test files above; pytest itself runs on the GPU machine
        _log("would run: " + " ".join(cmd[1:]))
        _emit({"step": "tests", "status": "ok", "tests": len(ids), "summary": f"{len(ids)} planned", "ids": ids})
        return
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_child_env())
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    for line in lines[-15:]:
        _log(line)
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error|tests? collected)",
                                                               ln)), "")
    _emit({"step": "tests", "status": "ok" if proc.returncode == 0 else "error", "tests": len(ids),
           "summary": summary.strip("= "), "seconds": round(time.perf_counter() - t0, 1),
           "returncode": proc.returncode})


# ------------------------------------------------------------------------------------------------------ hash
def copy_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read and written."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / t


def hash_throughput(device: str, points: int, repeats: int, backend: str = "torch",
                    **sizes: Any) -> dict[str, Any]:
    """Forward and forward + backward point-levels/s of :class:`HashGridEncoding2D` (``sizes``: overridden defaults)."""
    import torch

    from terratorch_eoplugins.nn.hash_encoding import HashGridEncoding2D

    torch.manual_seed(0)
    enc = HashGridEncoding2D(region_size=10980.0, backend=backend, **sizes).to(device)
    levels = len(enc.resolutions)
    feats = enc.out_dim // levels
    coords = torch.rand(points, 2, device=device) * enc.region_size
    params = [p for p in enc.parameters() if p.requires_grad]

    def fwd() -> None:
        with torch.no_grad():
            enc(coords)

    def fwd_bwd() -> None:
        out = enc(coords)
        torch.autograd.grad(out, params, torch.ones_like(out))

    t_f = _median_time(fwd, device, repeats)
    t_fb = _median_time(fwd_bwd, device, repeats)
    table_bytes = params[0].element_size() if params else 4
    return {"backend": backend, "levels": levels, "features": feats, "points": points,
            "bytes_per_point_level": 4 * feats * table_bytes,
            "fwd_point_levels_per_s": points * levels / t_f, "fwd_bwd_point_levels_per_s": points * levels / t_fb}


def _tcnn_available(try_install: bool, cap_s: float) -> tuple[bool, str]:
    try:
        import tinycudann  # type: ignore[import-not-found]  # noqa: F401

        return True, "importable"
    except Exception as err:  # noqa: BLE001  (an ImportError or a CUDA build/ABI error alike)
        why = f"{type(err).__name__}: {err}"
    if not try_install:
        return False, why
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--retries", "0", "--timeout", "5", "--no-build-isolation",
           "tinycudann"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap_s)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        if proc.returncode != 0:
            return False, f"not importable ({why}); pip install failed: {tail[0][:200]}"
    except subprocess.TimeoutExpired:
        return False, f"not importable ({why}); pip install did not finish in {cap_s:.0f} s"
    try:
        import importlib

        importlib.invalidate_caches()
        import tinycudann  # type: ignore[import-not-found]  # noqa: F401,F811

        return True, "installed by pip"
    except Exception as err:  # noqa: BLE001
        return False, f"installed but not importable: {err}"


def step_hash(args: argparse.Namespace) -> None:
    dev = args.device
    if args.dry_run:  # tiny CPU version of the same measurement code
        bw = copy_bandwidth(dev, 1 << 24, repeats=2)
        r = hash_throughput(dev, 4096, 1, levels=4, features_per_level=8, log2_table_size=12)
    else:
        bw = copy_bandwidth(dev, 1 << 31)
        r = hash_throughput(dev, args.hash_points, 5)
    bound = bw / r["bytes_per_point_level"]
    rec: dict[str, Any] = {"step": "hash", "status": "ok", "device": dev, "copy_bandwidth_GBps": round(bw / 1e9, 1),
                           **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()},
                           "bound_point_levels_per_s": round(bound), "fwd_over_bound": round(
                               r["fwd_point_levels_per_s"] / bound, 3),
                           "fwd_over_h100_reference": round(r["fwd_point_levels_per_s"] / H100_REFERENCE_POINT_LEVELS,
                                                            3)}
    _log(f"hash grid L={r['levels']} F={r['features']} {r['points']} points on {dev}: forward "
         f"{r['fwd_point_levels_per_s']:.3g} point-levels/s, forward+backward {r['fwd_bwd_point_levels_per_s']:.3g}; "
         f"copy bandwidth {bw / 1e9:.0f} GB/s -> gather bound {bound:.3g} point-levels/s "
         f"(forward at {rec['fwd_over_bound']:.1%} of it; {rec['fwd_over_h100_reference']:.2f}x the H100 figure "
         f"{H100_REFERENCE_POINT_LEVELS:.1e})")
    if dev == "cuda":
        ok, why = _tcnn_available(args.try_install_tcnn, 25.0)
        rec["tcnn"] = why
        if ok:
            try:
                t = hash_throughput(dev, args.hash_points, 5, backend="tcnn")
                rec["tcnn_fwd_point_levels_per_s"] = round(t["fwd_point_levels_per_s"])
                rec["tcnn_fwd_bwd_point_levels_per_s"] = round(t["fwd_bwd_point_levels_per_s"])
                rec["ours_over_tcnn_fwd"] = round(r["fwd_point_levels_per_s"] / t["fwd_point_levels_per_s"], 3)
                rec["ours_over_tcnn_fwd_bwd"] = round(
                    r["fwd_bwd_point_levels_per_s"] / t["fwd_bwd_point_levels_per_s"], 3)
                _log(f"tiny-cuda-nn: forward {t['fwd_point_levels_per_s']:.3g}, forward+backward "
                     f"{t['fwd_bwd_point_levels_per_s']:.3g} point-levels/s; ours/tcnn {rec['ours_over_tcnn_fwd']}x "
                     f"forward, {rec['ours_over_tcnn_fwd_bwd']}x forward+backward")
            except Exception as err:  # noqa: BLE001
                rec["tcnn"] = f"importable, but its run failed: {type(err).__name__}: {err}"
        _log(f"tiny-cuda-nn: {rec['tcnn']}")
    _emit(rec)
    # the repository's lean-vs-naive benchmark, side by side on the same device
    bench = [sys.executable, str(BENCH / "hash_encoding.py")]
    if args.dry_run:
        proc = subprocess.run([*bench, "--help"], capture_output=True, text=True, env=_child_env())
        missing = [f for f in ("--device", "--points", "--json", "--impls") if f not in proc.stdout]
        _emit({"step": "hash_encoding.py", "status": "ok" if proc.returncode == 0 and not missing else "error",
               "parsed": proc.returncode == 0, "missing_flags": missing})
        return
    proc = subprocess.run([*bench, "--device", dev, "--points", str(args.naive_points), "--repeats", "3", "--json"],
                          capture_output=True, text=True, env=_child_env())
    if proc.returncode != 0:
        _emit({"step": "hash_encoding.py", "status": "error", "tail": proc.stderr[-1500:]})
        return
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ratios = res.get("ratios", {})
    for impl, r2 in ratios.items():
        _log(f"hash_encoding.py {impl}/naive ({args.naive_points} points): throughput "
             f"{r2['throughput_ratio']:.2f}x, peak memory {r2['peak_memory_ratio']:.3f}")
    _emit({"step": "hash_encoding.py", "status": "ok", "ratios": ratios,
           **{f"{k}_points_per_s": round(v["points_per_s"]) for k, v in res.items() if isinstance(v, dict)
              and "points_per_s" in v}})


# ------------------------------------------------------------------------------------------------------- knn
def knn_gpu_vs_faiss(device: str, queries: int, database: int, dim: int, k: int, faiss_queries: int,
                     threads: int, classes: int = 19) -> dict[str, Any]:
    """KNNDatabase search (+ vote) on ``device`` against faiss IndexFlatIP on the CPU, on the same data."""
    import faiss
    import torch

    from terratorch_eoplugins.nn.knn import KNNDatabase

    gen = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(database, dim, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=gen), dim=1)
    labels = torch.randint(0, classes, (database,), generator=gen)
    db = KNNDatabase(dim, "classification", num_classes=classes)
    db.add(keys, labels)
    qd = q.to(device)
    out: dict[str, Any] = {"queries": queries, "database": database, "dim": dim, "k": k, "device": device}
    found = {}
    for name, chunk in (("default_chunk", None), ("chunk_1GiB", 1 << 30)):
        kw = {} if chunk is None else {"max_chunk_bytes": chunk}
        t = _median_time(lambda kw=kw: db.search(qd, k, **kw), device, 2)
        out[f"ours_{name}_queries_per_s"] = round(queries / t)
        found[name] = db.search(qd, k, **kw)[1]
    t = _median_time(lambda: db.predict(qd, k), device, 1)  # search + distance-weighted vote
    out["ours_predict_queries_per_s"] = round(queries / t)
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(dim)
    index.add(keys.numpy())
    sub = q[:faiss_queries].numpy()
    t0 = time.perf_counter()
    _, idx_f = index.search(sub, k)
    t_f = time.perf_counter() - t0
    out.update({"faiss_queries": len(sub), "faiss_threads": threads, "faiss_cpu_queries_per_s": round(len(sub) / t_f)})
    best = max(out["ours_default_chunk_queries_per_s"], out["ours_chunk_1GiB_queries_per_s"])
    out["ours_over_faiss"] = round(best / out["faiss_cpu_queries_per_s"], 2)
    a = found["default_chunk"][: len(sub)].cpu().sort(dim=1).values
    b = torch.from_numpy(idx_f).sort(dim=1).values
    out["same_neighbour_set"] = round(float((a == b).all(dim=1).double().mean()), 5)
    return out


def step_knn(args: argparse.Namespace) -> None:
    dev = args.device
    threads = os.cpu_count() or 1
    if args.dry_run:
        r = knn_gpu_vs_faiss(dev, 512, 4096, 64, 10, 512, 1)
    else:
        r = knn_gpu_vs_faiss(dev, args.knn_queries, args.knn_database, 64, 50, args.faiss_queries, threads)
    _log(f"KNN k={r['k']} D={r['dim']} database {r['database']}: ours on {dev} "
         f"{r['ours_default_chunk_queries_per_s']:,} q/s (default chunk), {r['ours_chunk_1GiB_queries_per_s']:,} q/s "
         f"(1 GiB chunks); faiss IndexFlatIP on {r['faiss_threads']} CPU threads {r['faiss_cpu_queries_per_s']:,} q/s "
         f"-> ours/faiss {r['ours_over_faiss']}x; same neighbour set on {100 * r['same_neighbour_set']:.3f}% "
         f"of {r['faiss_queries']} queries")
    _emit({"step": "knn", "status": "ok", **r})
    # the repository's CPU benchmark (ours vs faiss in one process); on the GPU when it offers --device
    script = BENCH / "knn_retrieval.py"
    source = script.read_text()  # its flags, read without importing it (its imports take seconds)
    extra = ["--device", dev] if '"--device"' in source and dev == "cuda" else []
    size = ["--queries", str(args.faiss_queries), "--threads", str(threads)]
    if args.dry_run:
        missing = [f for f in ("--queries", "--threads", "--json") if f'"{f}"' not in source]
        _log(f"would run: knn_retrieval.py {' '.join(size + extra)} --json <file>")
        _emit({"step": "knn_retrieval.py", "status": "error" if missing else "ok", "missing_flags": missing})
        return
    bench = [sys.executable, str(script)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "knn.json"
        proc = subprocess.run([*bench, *size, *extra, "--json", str(out)], capture_output=True, text=True,
                              env=_child_env())
        if proc.returncode != 0 or not out.is_file():
            _emit({"step": "knn_retrieval.py", "status": "error", "tail": proc.stderr[-1500:]})
            return
        res = json.loads(out.read_text())
    keep = {k: v for k, v in res.items() if k.startswith(("ratio", "same_", "ours_", "faiss_", "queries", "threads"))}
    _log(f"knn_retrieval.py {' '.join(size + extra)}: " + ", ".join(f"{k}={v}" for k, v in keep.items()))
    _emit({"step": "knn_retrieval.py", "status": "ok", "args": size + extra, **keep})


# ----------------------------------------------------------------------------------------------------- train
def paper_configs(patterns: list[str]) -> list[Path]:
    """Top-level configs matching ``patterns`` (globs in ``configs/``), sorted, without duplicates."""
    found: dict[Path, None] = {}
    for pat in patterns:
        for p in sorted((REPO / "configs").glob(pat)):
            found[p] = None
    return list(found)


def config_summary(config: Path) -> dict[str, Any]:
    """Model class, backbone and trainer/data pieces of a top-level config, read from its YAML pieces."""
    import yaml

    cfg = yaml.safe_load(config.read_text()) or {}
    out: dict[str, Any] = {"config": config.stem}
    for key in ("trainer", "data", "model"):
        piece = cfg.get(key)
        if isinstance(piece, str):
            out[f"{key}_piece"] = piece
            piece = yaml.safe_load((config.parent / piece).read_text()) or {}
        if key in ("data", "model") and isinstance(piece, dict):
            out[f"{key}_class"] = str(piece.get("class_path", "?")).rsplit(".", 1)[-1]
            init = piece.get("init_args") or {}
            margs = init.get("model_args") or {}
            backbone = margs.get("backbone") or init.get("variant") or init.get("backbone")
            if backbone:
                out["backbone"] = backbone
            if key == "data" and "batch_size" in init:
                out["config_batch_size"] = init["batch_size"]
    return out


def data_root_overrides(config: Path, world: str, prefix: str = "data/demo/") -> list[str]:
    """``--data.init_args.<arg>=<world>/...`` for every argument of the config's data piece under ``prefix``."""
    import yaml

    data = (yaml.safe_load(config.read_text()) or {}).get("data")
    if isinstance(data, str):
        data = yaml.safe_load((config.parent / data).read_text())
    init = (data or {}).get("init_args") or {}
    return [f"--data.init_args.{k}={Path(world) / v[len(prefix):]}" for k, v in init.items()
            if isinstance(v, str) and v.startswith(prefix)]


def train_args(config: Path, world: str, accelerator: str, precision: str, max_steps: int, root: str) -> list[str]:
    """terratorch CLI arguments of one measured training run of ``config`` on the world at ``world``."""
    return ["-c", str(config), *data_root_overrides(config, world),
            f"--trainer.accelerator={accelerator}", "--trainer.devices=1", f"--trainer.precision={precision}",
            f"--trainer.max_steps={max_steps}", "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}"]


def _batch_size(batch: Any) -> int | None:
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, dict):
        items = [batch["image"]] if "image" in batch else list(batch.values())
    elif isinstance(batch, list | tuple):
        items = list(batch)
    else:
        return None
    for item in items:
        n = _batch_size(item)
        if n is not None:
            return n
    return None


def _step_timer(warmup: int, steps: int, stop_at: float):
    """A Lightning callback timing each training batch (synchronised), stopping after ``warmup + steps`` batches or
    at ``stop_at`` (``time.monotonic()``), whichever comes first."""
    import torch
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.sizes: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
            self.sizes.append(_batch_size(batch) or 0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            if len(self.times) >= warmup + steps or time.monotonic() > stop_at:
                trainer.should_stop = True

    return StepTimer()


def train_one(config: Path, args: argparse.Namespace, root: str, stop_at: float) -> dict[str, Any]:
    """Build ``config`` through terratorch's CLI (``run=False``), fit a few steps (until ``stop_at`` at the latest,
    ``time.monotonic()``), return timings and memory."""
    import gc

    import torch
    from terratorch.cli_tools import build_lightning_cli

    from terratorch_eoplugins.benchmark.callbacks import count_parameters

    rec: dict[str, Any] = config_summary(config)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    cli_args = train_args(config, args.world, accelerator, args.precision, args.warmup + args.steps, root)
    t0 = time.perf_counter()
    cli = build_lightning_cli(cli_args, run=False)
    rec["build_s"] = round(time.perf_counter() - t0, 1)
    total, tunable = count_parameters(cli.model)
    rec.update(total_params=total, tunable_params=tunable)
    timer = _step_timer(args.warmup, args.steps, stop_at)
    cli.trainer.callbacks.append(timer)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    rec["fit_s"] = round(time.perf_counter() - t1, 1)
    # the steps after the warm-up; a config stopped by its time share keeps its last warm-up step (flagged)
    timed, sizes = timer.times[args.warmup:], timer.sizes[args.warmup:]
    rec["steps_timed"] = len(timed)
    if not timed and timer.times:
        timed, sizes = timer.times[-1:], timer.sizes[-1:]
        rec["note"] = "time share spent in warm-up: the last warm-up step is reported"
    if timed:
        step = statistics.median(timed)
        rec.update(step_ms=round(step * 1e3, 2), batch_size=int(statistics.median(sizes)),
                   samples_per_s=round(statistics.median(sizes) / step, 1),
                   first_step_ms=round(timer.times[0] * 1e3, 1))
    if args.device == "cuda":
        rec["peak_allocated_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        rec["peak_reserved_MiB"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    rec["status"] = "ok" if timed else "no training steps"
    del cli
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rec


def train_worker(args: argparse.Namespace) -> None:
    """Process every config of ``args.configs`` (paths) in turn; one ``@@RESULT`` line each."""
    import warnings

    warnings.filterwarnings("ignore")
    # the parent's deadline, as time.time(); each config gets an equal share of what is left, its steps stop at 80% of
    # it (the parent kills a config only past its whole share plus a grace period)
    deadline = time.monotonic() + (args.deadline_unix - time.time())
    with tempfile.TemporaryDirectory() as root:
        for i, cfg in enumerate(args.configs):
            print(START + cfg, flush=True)
            share = max((deadline - time.monotonic()) / (len(args.configs) - i), args.min_config_s)
            try:
                rec = train_one(Path(cfg), args, root, time.monotonic() + 0.8 * share)
            except BaseException as err:  # noqa: BLE001  (SystemExit from the CLI parser included)
                rec = {**config_summary(Path(cfg)), "status": "error", "error": f"{type(err).__name__}: {err}"[:1500]}
            _emit({"step": "train", **rec})


def _start_world(world: Path) -> subprocess.Popen:
    code = ("import sys; from terratorch_eoplugins.cli import main; "
            "sys.exit(main(['synth', '--out', sys.argv[1], '--size', 'tiny']))")
    log = open(world.parent / "synth.log", "w")  # noqa: SIM115  (the child writes it; read after it ends)
    return subprocess.Popen([sys.executable, "-c", code, str(world)], cwd=REPO, env=_child_env(),
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def step_train(args: argparse.Namespace, configs: list[Path], deadline: float,
               writer: subprocess.Popen | None) -> list[dict[str, Any]]:
    """Run the train worker over ``configs``, restarting it after a config that hangs or crashes it."""
    results: list[dict[str, Any]] = []
    if writer is not None:
        t0 = time.monotonic()
        try:
            writer.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(writer.pid, signal.SIGKILL)
            writer.wait()
            return [{"step": "train", "status": "timeout", "error": "the tiny world was not written in time"}]
        if writer.returncode != 0:
            out = (Path(args.world).parent / "synth.log").read_text()
            return [{"step": "train", "status": "error", "error": f"eoplugins synth failed:\n{out[-1500:]}"}]
        _log(f"  [train] tiny world ready (waited {time.monotonic() - t0:.0f} s more for it)")
    todo = list(configs)
    while todo:
        remaining = deadline - time.monotonic()
        if remaining < 5:
            results += [{"step": "train", **config_summary(c), "status": "skipped (budget spent)"} for c in todo]
            break
        argv = [sys.executable, str(Path(__file__).resolve()), "--_train-worker", "--world", str(args.world),
                "--device", args.device, "--precision", args.precision, "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--min-config-s", str(args.min_config_s),
                "--deadline-unix", str(time.time() + deadline - time.monotonic()),
                "--configs", *map(str, todo)]
        child = _Child(argv, _child_env())
        started = time.monotonic()
        current: Path | None = None
        cfg_deadline = time.monotonic() + max(remaining / len(todo), args.min_config_s) + args.grace_s
        try:
            while True:
                line = child.next_line(min(cfg_deadline, deadline))
                if line is None:
                    break
                if line.startswith(START):
                    current = Path(line[len(START):])
                    started = time.monotonic()
                    cfg_deadline = time.monotonic() + max((deadline - time.monotonic()) / len(todo),
                                                          args.min_config_s) + args.grace_s
                elif line.startswith(RESULT):
                    rec = json.loads(line[len(RESULT):])
                    results.append(rec)
                    _log(f"  [train] {_train_line(rec)}")
                    if current in todo:
                        todo.remove(current)
                    current = None
                elif args.verbose:
                    _log(f"  [train] {line}")
        except TimeoutError:
            child.kill()
            if current is None:
                current = todo[0]
            rec = {"step": "train", **config_summary(current), "status": "timeout",
                   "error": f"stopped past its time share, after {time.monotonic() - started:.0f} s"}
            results.append(rec)
            _log(f"  [train] {_train_line(rec)}")
            todo.remove(current)
            continue
        rc = child.proc.wait()
        if todo:  # the worker died inside a config (e.g. a CUDA fault or the OOM killer)
            bad = current or todo[0]
            results.append({"step": "train", **config_summary(bad), "status": "error",
                            "error": f"worker exited with {rc}: " + "\n".join(child.tail[-8:])})
            todo.remove(bad)
    return results


def _train_line(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r.get('config', '?'):32s} {r.get('status')}: {str(r.get('error', ''))[:300]}"
    mem = f"peak {r['peak_allocated_MiB']:,.0f} MiB" if "peak_allocated_MiB" in r else "peak n/a (cpu)"
    return (f"{r['config']:32s} {r.get('model_class', '?')}/{r.get('backbone', '-')} "
            f"{r['total_params'] / 1e6:8.2f} M params, batch {r['batch_size']}: {r['step_ms']:8.1f} ms/step, "
            f"{r['samples_per_s']:9.1f} samples/s, {mem} (build {r['build_s']} s, {r['steps_timed']} timed steps)")


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan; run argument parsing and tiny CPU versions")
    p.add_argument("--steps-to-run", nargs="+", default=list(STEPS), choices=STEPS, metavar="STEP",
                   help=f"steps to run, in this order (default: {' '.join(STEPS)})")
    p.add_argument("--budget-s", type=float, default=440.0, help="wall-clock budget of the whole check")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="top-level config globs in configs/ (default: the four models' configs)")
    p.add_argument("--world", default=None, help="a tiny world written by `eoplugins synth` (default: write one)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda (cpu with --dry-run)")
    p.add_argument("--precision", default="bf16-mixed", help="--trainer.precision of the training steps")
    p.add_argument("--warmup", type=int, default=2, help="training steps before the timed ones")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per config")
    p.add_argument("--min-config-s", type=float, default=12.0,
                   help="least time share of one config (each gets an equal share of the time left)")
    p.add_argument("--grace-s", type=float, default=8.0, help="time past its share before a config is killed")
    p.add_argument("--hash-points", type=int, default=1 << 20, help="points of the hash-encoding throughput runs")
    p.add_argument("--naive-points", type=int, default=1 << 18, help="points of benchmarks/hash_encoding.py")
    p.add_argument("--try-install-tcnn", action=argparse.BooleanOptionalAction, default=True,
                   help="try `pip install tinycudann` when it does not import")
    p.add_argument("--knn-queries", type=int, default=1 << 20)
    p.add_argument("--knn-database", type=int, default=1 << 18)
    p.add_argument("--faiss-queries", type=int, default=1 << 15, help="queries faiss searches (CPU)")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--verbose", action="store_true", help="echo the training worker's own output")
    for step, cap in DEFAULT_CAPS.items():
        p.add_argument(f"--cap-{step}", type=float, default=cap, help=f"time cap of the {step} step (s)")
    p.add_argument("--_step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_train-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deadline-unix", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.dry_run else "cuda"
    return args


def _forward_args(argv: list[str]) -> list[str]:
    """The command line without ``--steps-to-run`` (children get one step each)."""
    out, skip = [], False
    for a in argv:
        if a == "--steps-to-run":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args._train_worker:
        train_worker(args)
        return 0
    if args._step:
        for step in args._step.split(","):
            {"tests": step_tests, "hash": step_hash, "knn": step_knn}[step](args)
        return 0
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    import torch  # noqa: F401  (dry run: torch only, the package's imports are left to the children)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: --device cuda, but torch sees no CUDA device (use --dry-run on a CPU machine)",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (CPU)"
    configs = paper_configs(args.configs) if "train" in args.steps_to_run else []
    _log(f"device check: torch {torch.__version__}, GPU {gpu}, {os.cpu_count()} CPU cores, budget {args.budget_s:.0f} s"
         f"{', DRY RUN' if args.dry_run else ''}")
    _log("plan:")
    for step in args.steps_to_run:
        if step == "train":
            _log(f"  train: {len(configs)} configs ({' '.join(args.configs)}), {args.warmup} warm-up + {args.steps} "
                 f"timed steps each, --trainer.precision {args.precision}, world "
                 f"{args.world or 'written now (eoplugins synth --size tiny)'}, the rest of the budget")
            for c in configs:
                s = config_summary(c)
                _log(f"    {c.name:32s} model {s.get('model_class', '?')} backbone {s.get('backbone', '-')} "
                     f"data {s.get('data_class', '?')} trainer {s.get('trainer_piece', '?')}")
        else:
            _log(f"  {step}: cap {getattr(args, 'cap_' + step):.0f} s")
    results: list[dict[str, Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="device_check_")
    writer = None
    if "train" in args.steps_to_run and configs:
        if args.world is None and not args.dry_run:
            args.world = str(Path(tmp.name) / "world")
            writer = _start_world(Path(args.world))  # CPU work, overlaps the GPU steps
        if args.dry_run:  # argument lists only: nothing is built or trained
            world = args.world or str(Path(tmp.name) / "world")
            for c in configs:
                cli = train_args(c, world, "gpu", args.precision, args.warmup + args.steps, tmp.name)
                results.append({"step": "train", **config_summary(c), "status": "planned", "args": cli})
            _log(f"  train: argument lists of {len(configs)} configs built (dry run: nothing trained)")
    # a dry run's measuring steps share one child process (each child spends seconds importing the package)
    groups = [s for s in args.steps_to_run if s != "train"] if args.dry_run else []
    order = ([",".join(groups)] if groups else []) + [s for s in args.steps_to_run if s not in groups]
    try:
        for step in order:
            left = deadline - time.monotonic()
            if step == "train":
                if not args.dry_run and configs:
                    _log(f"== train ({left:.0f} s left)")
                    results += step_train(args, configs, deadline, writer)
                    writer = None
                continue
            cap = min(sum(getattr(args, f"cap_{s}") for s in step.split(",")), left)
            _log(f"== {step} (cap {cap:.0f} s)")
            if cap < 3:
                results.append({"step": step, "status": "skipped (budget spent)"})
                continue
            argv_step = [sys.executable, str(Path(__file__).resolve()), *_forward_args(raw), "--_step", step,
                         "--device", args.device]
            results += run_guarded(step, argv_step, cap)
    finally:
        if writer is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(writer.pid, signal.SIGKILL)
            writer.wait()
        tmp.cleanup()
    _log(f"== summary ({time.monotonic() - t_start:.0f} s of {args.budget_s:.0f})")
    for r in results:
        if r.get("status") == "planned":
            continue
        if r["step"] == "train":
            _log(f"  train {_train_line(r)}")
        else:
            brief = {k: v for k, v in r.items() if k not in ("args", "tail", "step")}
            _log(f"  {r['step']}: {json.dumps(brief)[:400]}")
            if r.get("tail"):
                _log("    " + r["tail"].replace("\n", "\n    ")[-1200:])
    bad = [r for r in results if r.get("status") in ("error", "timeout")]
    _log(f"steps with errors or timeouts: {len(bad)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
