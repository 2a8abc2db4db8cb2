"""What is in the store and where it came from: listings, lineage, garbage collection (``rlhf store``).

Lineage comes from the manifests: ``upstream`` (stage -> key of the inputs) links every output to the
outputs it was made from, ``producer`` names the flow run that made it. Downstream users are the outputs
whose ``upstream`` names it.

Garbage collection keeps the ``keep`` most recent *results* and everything they were made from. A result
is an output nothing in the store was made from (an evaluation, or the PPO/export/SFT output a run ended
at). It never removes an output that an unexpired stage lease holds or reads, one younger than the grace
period (a running flow may be about to read it), or what either of those was made from; a folder without
a manifest (a failed or running attempt, with the checkpoints a retry resumes from) is only removed with
``include_partial`` and when nothing touched it within the grace period.
"""

from __future__ import annotations

import datetime as _dt
import json
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from rlhf_core.stages.registry import DATA, EVALUATE, EXPORT, ORDER, PLOTS, REPORT, headline
from rlhf_core.storage.lease import list_leases
from rlhf_core.storage.store import MANIFEST, Manifest, Store

Ref = tuple[str, str]  # (stage, key)


def ref_of(m: Manifest) -> Ref:
    return (m.stage, m.key)


def upstream_refs(m: Manifest) -> list[Ref]:
    return sorted(m.upstream.items())


def downstream_index(manifests: Iterable[Manifest]) -> dict[Ref, list[Ref]]:
    """(stage, key) -> the outputs whose manifest names it as an input."""
    out: dict[Ref, list[Ref]] = {}
    for m in manifests:
        for up in upstream_refs(m):
            out.setdefault(up, []).append(ref_of(m))
    return {k: sorted(v) for k, v in out.items()}


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _stage_rank(stage: str) -> int:
    return ORDER.index(stage) if stage in ORDER else len(ORDER)


def _producer(m: Manifest) -> str:
    p = m.producer
    run = p.get("flow_run_name") or (p.get("flow_run_id") or "")[:8] or "-"
    return f"{run} (imported)" if p.get("imported_from") else run


# ------------------------------------------------------------------------------------------------ listing


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


def ls(store: Store, stage: str | None = None) -> str:
    """One line per complete output: stage, key, size, created, producer run, upstream keys, headline."""
    manifests = sorted(store.list_outputs(stage), key=lambda m: (_stage_rank(m.stage), m.created_at))
    if not manifests:
        return f"{store.url}: no complete outputs" + (f" of stage {stage!r}" if stage else "")
    rows = [[m.stage, m.key, human_size(m.total_bytes), m.created_at[:19].replace("T", " "), _producer(m),
             " ".join(f"{s}:{k[:8]}" for s, k in upstream_refs(m)) or "-", headline(m)] for m in manifests]
    out = table(rows, ["stage", "key", "size", "created (UTC)", "flow run", "upstream", "headline"])
    partial = partial_outputs(store, stage)
    if partial:
        out += "\n\nwithout manifest (a running or failed attempt):\n" + "\n".join(
            f"  {s}/{k}  {human_size(p.size)}  last written {_iso(p.mtime)}" for (s, k), p in sorted(partial.items()))
    return out


def resolve(store: Store, text: str) -> Manifest:
    """An output named ``stage/key``, ``key`` or a unique key prefix (6+ characters).

    Raises:
        KeyError: nothing, or more than one output, matches; the message says what to give instead.
    """
    stage, _, key = text.strip().strip("/").rpartition("/")
    if len(key) < 6:
        raise KeyError(f"{text!r} is too short to name an output: give stage/key or at least 6 characters of a key")
    candidates = [m for m in store.list_outputs(stage.rsplit("/", 1)[-1] or None) if m.key.startswith(key)]
    if not candidates:
        raise KeyError(f"no complete output {text!r} in {store.url}; `rlhf store ls` lists them")
    if len(candidates) > 1:
        names = ", ".join(f"{m.stage}/{m.key}" for m in candidates)
        raise KeyError(f"{text!r} matches {len(candidates)} outputs ({names}); give stage/key")
    return candidates[0]


def show(store: Store, text: str) -> str:
    """A manifest in words: what it is, files, metrics, the upstream chain (recursively), downstream users."""
    m = resolve(store, text)
    by_ref = {ref_of(x): x for x in store.list_outputs()}
    down = downstream_index(by_ref.values())
    p = m.producer
    lines = [f"{m.stage}/{m.key}  {store.url_of(m.stage, m.key)}",
             f"  created     {m.created_at}",
             f"  produced by flow run {p.get('flow_run_name', '-')} ({p.get('flow_run_id', '-')}), "
             f"flow {p.get('flow_name', '-')}, task run {p.get('task_run_id', '-')}, host {p.get('host', '-')}",
             f"  content     {m.content_id}",
             f"  size        {human_size(m.total_bytes)} in {len(m.files)} files"]
    if p.get("imported_from"):
        lines.append(f"  imported    from {p['imported_from']} at {p.get('imported_at', '-')}")
    lines.append("  metrics")
    for k, v in m.metrics.items():
        lines.append(f"    {k}: {json.dumps(v) if not isinstance(v, float) else f'{v:.4g}'}")
    lines.append("  files")
    for f in m.files:
        lines.append(f"    {f.path}  {human_size(f.size)}  {f.sha256[:12]}")
    lines.append("  upstream")
    lines += _chain(m, by_ref, depth=2) or ["    (none)"]
    lines.append("  downstream")
    lines += [f"    {s}/{k}" for s, k in down.get(ref_of(m), [])] or ["    (none)"]
    return "\n".join(lines)


def _chain(m: Manifest, by_ref: dict[Ref, Manifest], depth: int) -> list[str]:
    out = []
    for stage, key in upstream_refs(m):
        up = by_ref.get((stage, key))
        if up is None:
            out.append("  " * depth + f"{stage}/{key}  (not in this store)")
            continue
        out.append("  " * depth + f"{stage}/{key}  {human_size(up.total_bytes)}  {_producer(up)}  {headline(up)}".rstrip())
        out += _chain(up, by_ref, depth + 1)
    return out


# ------------------------------------------------------------------------------------------ partial outputs


@dataclass
class Partial:
    size: int
    mtime: float
    upstream: dict[str, str] = field(default_factory=dict)  # from the attempt's job.json, when it has one


def partial_outputs(store: Store, stage: str | None = None) -> dict[Ref, Partial]:
    """Output folders without a manifest: attempts running now, or that failed (their checkpoints stay)."""
    out: dict[Ref, Partial] = {}
    for s in [stage] if stage else store.list_stages():
        for key in store._children(store.path(s)):
            if store.fs.exists(store.output_path(s, key, MANIFEST)):
                continue
            files = store.fs.find(store.output_path(s, key), detail=True)
            upstream = {}
            job = files.get(store.output_path(s, key, "job.json"))
            if job is not None:
                try:
                    upstream = {st: m["key"] for st, m in json.loads(store.fs.cat_file(job["name"]))["upstream"].items()}
                except (ValueError, KeyError, TypeError):
                    upstream = {}
            mtimes = [_mtime(info) for info in files.values()] or [_mtime(store.fs.info(store.output_path(s, key)))]
            out[(s, key)] = Partial(size=sum(i.get("size") or 0 for i in files.values()), mtime=max(mtimes),
                                    upstream=upstream)
    return out


def _mtime(info: dict[str, Any]) -> float:
    for k in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return _dt.datetime.fromisoformat(v).timestamp()
            except ValueError:
                continue
    return 0.0  # unknown: old


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _created(m: Manifest) -> float:
    return _dt.datetime.fromisoformat(m.created_at).timestamp()


# ---------------------------------------------------------------------------------------------------- gc


@dataclass
class GcPlan:
    results: list[Ref]  # the kept results, newest first
    keep: set[Ref]  # complete outputs kept (results and their inputs)
    protected: dict[Ref, str]  # kept for another reason: ref -> why (leased, young, read by a running stage)
    delete: list[Ref]  # complete outputs to remove, downstream before upstream
    delete_partial: list[Ref]  # folders without manifest to remove
    kept_partial: dict[Ref, str]  # folders without manifest left alone -> why
    sizes: dict[Ref, int]

    @property
    def freed_bytes(self) -> int:
        return sum(self.sizes.get(r, 0) for r in [*self.delete, *self.delete_partial])

    def describe(self, store: Store) -> str:
        lines = [f"keeping {len(self.results)} most recent results and what they were made from:"]
        lines += [f"  result  {s}/{k}" for s, k in self.results]
        lines += [f"  keep    {s}/{k}  ({why})" for (s, k), why in sorted(self.protected.items())]
        lines += [f"  keep    {s}/{k}  (partial: {why})" for (s, k), why in sorted(self.kept_partial.items())]
        lines += [f"  delete  {s}/{k}  {human_size(self.sizes.get((s, k), 0))}" for s, k in self.delete]
        lines += [f"  delete  {s}/{k}  {human_size(self.sizes.get((s, k), 0))} (partial)" for s, k in self.delete_partial]
        lines.append(f"frees {human_size(self.freed_bytes)} in {store.url}")
        return "\n".join(lines)


def plan_gc(store: Store, keep: int, grace_seconds: float, include_partial: bool = False,
            now: float | None = None) -> GcPlan:
    """What ``rlhf store gc --keep N`` removes; nothing is deleted here (see ``apply_gc``).

    Args:
        keep: how many results (outputs nothing else was made from) to keep, newest first; >= 0.
        grace_seconds: outputs and partial folders touched more recently than this stay (the lease ttl).
        include_partial: also remove folders without a manifest that nothing touched within the grace.
        now: the clock (epoch seconds), for tests.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    now = time.time() if now is None else now
    by_ref = {ref_of(m): m for m in store.list_outputs()}
    down = downstream_index(by_ref.values())

    def closure(refs: Iterable[Ref]) -> set[Ref]:
        seen: set[Ref] = set()
        todo = list(refs)
        while todo:
            ref = todo.pop()
            if ref in seen:
                continue
            seen.add(ref)
            if ref in by_ref:
                todo += upstream_refs(by_ref[ref])
        return seen

    results = sorted((r for r in by_ref if not any(d in by_ref for d in down.get(r, []))),
                     key=lambda r: _created(by_ref[r]), reverse=True)[:keep]
    keep_set = closure(results) & by_ref.keys()

    protected: dict[Ref, str] = {}

    def protect(refs: Iterable[Ref], why: str) -> None:
        for r in closure(refs):
            if r in by_ref and r not in keep_set:
                protected.setdefault(r, why)

    for lease in list_leases(store):
        if not lease.expired(now):
            ref = (lease.stage, lease.key)
            protect([ref], f"leased by {lease.holder.get('flow_run_name') or lease.holder.get('host', '?')}")
            protect(sorted(lease.upstream.items()), f"read by the leased {lease.stage}/{lease.key[:8]}")
    for ref, m in by_ref.items():
        if now - _created(m) < grace_seconds:
            protect([ref], "younger than the grace period")

    leased = {(lease.stage, lease.key) for lease in list_leases(store) if not lease.expired(now)}
    delete_partial, kept_partial = [], {}
    partial = partial_outputs(store)
    for ref, p in partial.items():
        if ref in leased or now - p.mtime < grace_seconds:
            kept_partial[ref] = "in progress"
            protect(sorted(p.upstream.items()), f"read by the running {ref[0]}/{ref[1][:8]}")
        elif include_partial:
            delete_partial.append(ref)
        else:
            kept_partial[ref] = "a failed attempt; --include-partial removes it"

    doomed = [r for r in by_ref if r not in keep_set and r not in protected]
    doomed.sort(key=lambda r: (-_stage_rank(r[0]), r[1]))  # downstream first: never an orphaned reference
    sizes = {r: by_ref[r].total_bytes for r in by_ref} | {r: p.size for r, p in partial.items()}
    return GcPlan(results=results, keep=keep_set, protected=protected, delete=doomed,
                  delete_partial=sorted(delete_partial), kept_partial=kept_partial, sizes=sizes)


def apply_gc(store: Store, plan: GcPlan, log=print) -> list[Ref]:
    """Delete what the plan says (manifest first), re-checking leases just before each removal."""
    removed = []
    for ref in [*plan.delete, *plan.delete_partial]:
        live = {(lease.stage, lease.key): lease for lease in list_leases(store) if not lease.expired()}
        reads = {r for lease in live.values() for r in lease.upstream.items()}
        if ref in live or ref in reads:
            log(f"skipped {ref[0]}/{ref[1]}: a run took a lease on it after the plan was made")
            continue
        store.delete_output(*ref)
        removed.append(ref)
        log(f"deleted {posixpath.join(store.url, *ref)}")
    return removed


# ------------------------------------------------------------------------------------------- run summary


def summary_markdown(title: str, store: Store, outputs: dict[str, Manifest], states: dict[str, str] | None = None) -> str:
    """The run summary (a Prefect artifact): every output of the run with its URL, how this run got it
    (trained, or found complete in the store), size and headline, then the evaluation report."""
    states = states or {}
    lines = [f"# {title}", "", f"Store: `{store.url}`", "",
             "| stage | output | this run | size | produced by | headline |", "|---|---|---|---|---|---|"]
    for name, m in outputs.items():
        url = store.url_of(m.stage, m.key)
        lines.append(f"| {name} | [{m.stage}/{m.key}]({url}) | {states.get(name, '')} | {human_size(m.total_bytes)} | "
                     f"{_producer(m)} | {headline(m)} |")
    if DATA in outputs:
        from rlhf_core.data.prepare import source_summary

        lines += ["", "Data sources (rows read, used per step's train set, oversampled, dropped):", ""]
        lines += [f"- {label}: {text}" for label, text in source_summary(outputs[DATA].metrics).items()]
    if EVALUATE in outputs:
        m = outputs[EVALUATE]
        lines += ["", f"Report: [{store.url_of(m.stage, m.key, REPORT)}]({store.url_of(m.stage, m.key, REPORT)})"]
        plots = [f.path for f in m.files if f.path.startswith(f"{PLOTS}/")]
        lines += [f"- [{p}]({store.url_of(m.stage, m.key, p)})" for p in plots]
    if EXPORT in outputs:
        m = outputs[EXPORT]
        for name in m.metrics.get("models", []):
            lines.append(f"- {name} actor (HF folder): [{store.url_of(m.stage, m.key, name)}]({store.url_of(m.stage, m.key, name)})")
    lines += ["", "Lineage: `rlhf store show KEY`; the store's contents: `rlhf store ls`."]
    return "\n".join(lines) + "\n"
