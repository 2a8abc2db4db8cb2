"""Metrics and progress of a training stage.

The metric history (a list of ``{"step": n, key: value}``) is the source of truth: it is saved in every
checkpoint, so a resumed stage keeps the curves from before the crash. Live, rank 0 appends to a JSONL
file and a TensorBoard run in the stage's output folder (``<root>/<stage>/<key>/live/``, on a local store;
``$RLHF_RUNS_DIR`` or the cache folder otherwise) and, when enabled and installed, to a Weights & Biases
run; at the end the stage output gets ``logs/metrics.jsonl``, ``logs/tensorboard/`` and ``logs/curves.png``,
all rebuilt from the full history, and the live folder goes (the output's commit clears it).

Progress shows as a tqdm bar on a terminal, or as ``@@progress {json}`` lines when RLHF_PROGRESS=lines
(how the Prefect task follows a worker subprocess and turns it into a progress artifact).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

PROGRESS_PREFIX = "@@progress "
# Third-party progress bars (transformers' "Loading weights", huggingface_hub's downloads) off in workers and
# in `rlhf` itself: each stage's own progress lines say it. Set it to 0 in the environment to see them.
QUIET_PROGRESS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


LIVE_DIR = "live"  # in a stage's output folder while it trains (never an output file)
WANDB_ENV = "RLHF_WANDB"  # 1/0: turn Weights & Biases logging on or off whatever logging.wandb says


def live_dir(store, stage: str, key: str) -> str:
    """Where a training stage's live metrics go: its output folder's ``live/`` on a local store (so that
    ``tensorboard --logdir <root>`` shows every stage, live or done), else ``$RLHF_RUNS_DIR`` or the cache
    folder, named after the stage and key."""
    local = store.local_path(stage, key, LIVE_DIR)
    if local is not None:
        return local
    from rlhf_core.storage.fingerprint import cache_root

    return os.path.join(os.environ.get("RLHF_RUNS_DIR") or str(cache_root() / "runs"), f"{stage}-{key}")


def wandb_wanted(logging_cfg) -> bool:
    flag = os.environ.get(WANDB_ENV)
    return flag.strip().lower() in ("1", "true", "yes", "on") if flag else bool(logging_cfg.wandb)


def open_wandb(logging_cfg, stage: str, key: str, config: dict[str, Any], group: str | None = None,
               log: Callable[[str], None] = print):
    """A Weights & Biases run for one attempt of a stage (named after the stage and key, grouped by the key),
    or None: not wanted, or wandb is not installed (said once). ``config`` is the stage's settings view, which
    holds no credentials (the store's are never in the config, wandb's come from its own login)."""
    if not wandb_wanted(logging_cfg):
        return None
    try:
        import wandb
    except ImportError:
        log("logging.wandb is on but wandb is not installed (pip install rlhf-flow[wandb]); logging to the store only")
        return None
    return wandb.init(project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity, name=f"{stage}-{key[:8]}",
                      group=group or f"{stage}-{key[:12]}", job_type=stage, config=config)


class MetricsLog:
    """The metric history, mirrored live (rank 0: ``enabled``) to a JSONL file and TensorBoard events in
    ``live``, and to a wandb run when one is given. A resumed stage's history is replayed to a new wandb run,
    so that every attempt's run shows the whole curve."""

    def __init__(self, stage: str, enabled: bool, history: list[dict[str, Any]] | None = None,
                 live: str | None = None, wandb_run=None):
        self.stage, self.enabled = stage, enabled
        self.history: list[dict[str, Any]] = list(history or [])
        self._writer = None
        self._jsonl = None
        self._wandb = wandb_run if enabled else None
        if enabled and live:
            os.makedirs(live, exist_ok=True)
            self._jsonl = open(os.path.join(live, "metrics.jsonl"), "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(live)
            except ImportError:  # tensorboard is a dependency; keep training if a slim install lacks it
                self._writer = None
        if self._wandb is not None:
            for row in self.history:
                self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._writer is not None:
            for k, v in metrics.items():
                self._writer.add_scalar(k, float(v), step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def last(self, key: str) -> float | None:
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return None

    def _close_live(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def close(self) -> None:
        """Close the live files and the wandb run (again: nothing)."""
        self._close_live()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def export(self, out_dir: str, title: str) -> list[str]:
        """Write metrics.jsonl, tensorboard/ and curves.png into ``out_dir``; returns the files written. The
        live files are closed first (the output's commit removes them).

        Wall-clock timings (``timing/*``) stay out: an output's files must be the same bytes whenever its key
        is (they are in the live run directory and, summarised, in the manifest: ``timing_summary``)."""
        self._close_live()
        os.makedirs(out_dir, exist_ok=True)
        history = [{k: v for k, v in row.items() if not k.startswith("timing/")} for row in self.history]
        files = [os.path.join(out_dir, "metrics.jsonl")]
        with open(files[0], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
        files.append(write_tensorboard(history, os.path.join(out_dir, "tensorboard")))
        png = os.path.join(out_dir, "curves.png")
        if plot_curves(history, png, title):
            files.append(png)
        return files


def timing_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per logged step of every ``timing/*`` metric (for the manifest)."""
    sums: dict[str, list[float]] = {}
    for row in history:
        for k, v in row.items():
            if k.startswith("timing/"):
                sums.setdefault(k.removeprefix("timing/"), []).append(v)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(sums.items())}


def write_tensorboard(history: list[dict[str, Any]], log_dir: str) -> str:
    """One TensorBoard event file of the history, byte-for-byte a function of it: wall time is the step
    (TensorBoard's own writer stamps the clock and the host into the file and its name)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "events.out.tfevents.rlhf")
    with open(path, "wb") as f:
        writer = RecordWriter(f)
        writer.write(Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())
        for row in history:
            step = int(row["step"])
            values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in row.items() if k != "step"]
            writer.write(Event(wall_time=float(step), step=step, summary=Summary(value=values)).SerializeToString())
    return path


def series(history: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in history:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                xs, ys = out.setdefault(k, ([], []))
                xs.append(row["step"])
                ys.append(v)
    return out


MARKERS_BELOW = 30  # a series with fewer points is drawn with a marker on each (two evaluations are two points)


def plot_curves(history: list[dict[str, Any]], path: str, title: str, keys: list[str] | None = None) -> bool:
    """One small panel per metric, saved as a PNG; returns False when there is nothing to plot."""
    fig = curves_figure(history, title, keys)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def curves_figure(history: list[dict[str, Any]], title: str, keys: list[str] | None = None):
    """The figure of ``plot_curves`` (None when there is nothing to plot). A series of few points gets a
    visible marker on each point, so that a line between two evaluations is not taken for a measured trend."""
    data = series(history)
    keys = [k for k in (keys or sorted(data)) if k in data and not k.startswith("timing/")]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys = data[key]
        few = len(xs) < MARKERS_BELOW
        ax.plot(xs, ys, marker="o" if few else None, markersize=4 if few else None, linewidth=1.0 if few else 1.2,
                linestyle="--" if len(xs) <= 2 else "-")
        ax.set_title(key + (f" ({len(xs)} points)" if len(xs) <= 2 else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class Progress:
    """A progress bar for rank 0: tqdm on a terminal, structured lines under a Prefect task."""

    def __init__(self, stage: str, total: int, initial: int = 0, enabled: bool = True):
        self.stage, self.total, self.n, self.enabled = stage, total, initial, enabled
        self.mode = os.environ.get("RLHF_PROGRESS", "bar")
        self._bar = None
        self._last_emit = 0.0
        if enabled and self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=stage, dynamic_ncols=True, file=sys.stderr)
        self._emit(force=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                                      refresh=False)
        self._emit(postfix=postfix, force=self.n >= self.total)

    def _emit(self, postfix: dict[str, Any] | None = None, force: bool = False) -> None:
        if not self.enabled or self.mode != "lines":
            return
        now = time.monotonic()
        if force or now - self._last_emit >= 2.0:
            self._last_emit = now
            payload = {"stage": self.stage, "step": self.n, "total": self.total, **(postfix or {})}
            print(PROGRESS_PREFIX + json.dumps(payload, default=float), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


PROGRESS_EVERY_ENV = "RLHF_PROGRESS_EVERY"  # seconds between a stage's progress lines in `rlhf run` (default 5)


class ProgressLines:
    """The other end of ``Progress`` in lines mode (what ``rlhf run`` shows for a worker): each ``@@progress``
    payload becomes one readable line at most every ``every`` seconds, and the last one always::

        sft  120/600 [00:21<01:24,  5.71 step/s] loss 1.234

    (tqdm's meter: steps done of the total, time since training started < time left at this rate, the rate,
    then the stage's metrics). One line per update, prefixed with the stage, so that two stages training at
    once stay readable in a terminal, a log file and the Prefect UI alike."""

    def __init__(self, stage: str, emit: Callable[[str], None], every: float | None = None):
        self.stage, self.emit = stage, emit
        self.every = float(os.environ.get(PROGRESS_EVERY_ENV, "5")) if every is None else every
        self.t0: float | None = None
        self.initial = 0
        self._last = -math.inf

    def feed(self, info: dict[str, Any], now: float | None = None) -> str | None:
        """Take one payload; returns the line it emitted, if any."""
        now = time.monotonic() if now is None else now
        step, total = int(info["step"]), int(info["total"])
        if self.t0 is None:  # the first payload: training starts here (a resumed stage starts past 0)
            self.t0, self.initial = now, step
        done = step >= total
        if not done and now - self._last < self.every:
            return None
        self._last = now
        line = self.format(info, now - self.t0)
        self.emit(line)
        return line

    def format(self, info: dict[str, Any], elapsed: float) -> str:
        from tqdm import tqdm

        step, total = int(info["step"]), int(info["total"])
        meter = tqdm.format_meter(step, total, elapsed, prefix=self.stage, unit=" step", initial=self.initial,
                                  bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
                         if k not in ("stage", "step", "total"))
        return f"{meter} {extra}".rstrip()


class Timer:
    """Wall time per named phase (device-synchronised), for ``timing/*`` metrics."""

    def __init__(self, device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)  # host-device sync: only for honest phase timings
