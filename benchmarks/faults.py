"""Faults tried from outside: `rlhf run` as a user runs it, killed, cut off from its store, and racing
another run for one reward model. Each subcommand prints a table of counts last and writes
``benchmarks/results/faults_<name>_<date>.json``.

    python benchmarks/faults.py kill [--trials 20] [--seed 0]      (a) SIGKILL a stage worker or the whole rlhf
    python benchmarks/faults.py s3 [--trials 3] [--seed 0]         (b) the pipeline on a local S3 that dies
    python benchmarks/faults.py shared-reward [--trials 3]         (c) two actors, one reward model, holder killed

(a) ``kill``: an uninterrupted reference run first, timing each stage (its lease taken to its manifest
    written, and its worker's life). Then each trial runs the same command on a fresh store and SIGKILLs,
    at a uniformly random time inside one stage (data, sft, reward, rl, export, evaluate), either that
    stage's worker (the task's retry resumes it within the run; the run is then re-run and must be all
    Cached) or the whole ``rlhf`` process (then re-run with the same command). A trial passes when the run
    completes, no worker or temporary server outlives a killed ``rlhf``, the re-run never waits for a lease,
    every stage holds the reference's files (same keys, same SHA-256 per file, export files re-hashed on
    disk) and evaluate's metrics.json equals the reference's byte for byte.
(b) ``s3``: a moto S3 server in this process, reached through a TCP front that can die abruptly (its
    listening socket closed and every open connection reset) and come back on the same port. The bucket's
    contents live on in this process, as a real S3's or MinIO's disk would: an outage, not data loss. A fresh
    run, a re-run (all six tasks Cached, no object changed), then per trial a run with another actor seed
    whose store dies at a random time in one of its stages; the run must end with a short, clear error (one
    ``rlhf:`` line, no traceback), the store must show no manifest for an unfinished stage (every manifest's
    files present with their hashes), and the next run, with the store back, must complete. The access key and
    secret (random values) are then searched for in every log, every object in the bucket, the Prefect home
    (its database included) and the download cache.
(c) ``shared-reward``: two runs with different actors and the same reward settings started at once on one
    store; once the reward stage has a checkpoint, at a random time, the process that holds the reward lease is
    SIGKILLed. The other run must take the reward stage over at once (not after the 600 s lease), resume
    from the killed run's checkpoint and complete; the killed run, re-run, finds the reward model Cached. The
    reward model must be trained once (one worker before the kill, one after) and equal the (a)-settings'
    reward model computed by a run alone.

Runs are the tiny profile made cheap with ``CHEAP`` (fewer steps, more checkpoints, fewer eval prompts),
the same for references and trials. CPU runs need no RLHF_DETERMINISTIC (it only changes CUDA kernels).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ["data", "sft", "reward", "rl", "export", "evaluate"]
WORKER_STAGES = ["sft", "reward", "rl", "evaluate"]
CHEAP = ["sft.max_steps=30", "reward.max_steps=30", "rl.max_steps=6", "sft.checkpoint_every=10",
         "reward.checkpoint_every=10", "rl.checkpoint_every=2", "eval.num_prompts=16"]
RUN_TIMEOUT = 1200  # a run still going after this long counts as hung (a deadlock)
SERVER_UP = re.compile(r"rlhf: temporary Prefect API server on ")  # the run's first line, not an error


# ------------------------------------------------------------------------------------------- processes


def processes() -> dict[int, str]:
    """pid -> command line of every process on this machine."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    out[int(name)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def worker_pid(store: str, stage: str) -> int | None:
    for pid, cmd in processes().items():
        if "rlhf_core.stages.launch" in cmd and f" {stage} " in cmd and f"{store}/{stage}/" in cmd:
            return pid
    return None


def survivors(store: str, port: int | None) -> list[str]:
    """Processes of a killed run still alive: its workers, or its temporary Prefect server."""
    return [f"{pid}: {cmd[:120]}" for pid, cmd in processes().items()
            if (f"{store}/" in cmd and "rlhf_core.stages.launch" in cmd)
            or (port and "uvicorn" in cmd and f"--port {port} " in cmd)]


class Run:
    """One ``rlhf run --profile tiny`` as a user starts it, logged to a file, in its own session (so that
    this script can clean up whatever a failed trial leaves)."""

    def __init__(self, store: str, log: Path, env: dict[str, str], sets: list[str] = ()):
        self.store, self.log = store, log
        args = [a for s in [*CHEAP, *sets] for a in ("--set", s)]
        self._f = open(log, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--set",
                                      f"storage.root={store}", *args], cwd=ROOT, env=env, stdout=self._f,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.seconds: float | None = None

    def wait(self, timeout: float = RUN_TIMEOUT) -> int | None:
        """The exit code, or None when it ran past ``timeout`` (it is then killed)."""
        try:
            code = self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            code = None
        self.seconds = time.monotonic() - self.t0
        self._f.close()
        return code

    def kill(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        """After a trial: nothing of this run may stay (counted before this as survivors, if any)."""
        for pid in [int(s.split(":")[0]) for s in survivors(self.store, self.port)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def port(self) -> int | None:
        # rlhf's own start of Prefect's temporary server (flows/environment.py), once it answers
        m = re.search(r"temporary Prefect API server on http://127\.0\.0\.1:(\d+)/api", self.text())
        return int(m.group(1)) if m else None

    def task_states(self) -> dict[str, str]:
        return dict(re.findall(r"Task run '([a-z-]+)-[0-9a-f]+' - Finished in state (\w+)\(", self.text()))


def env_for(work: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "RLHF_FAULT"))}
    env.update(PREFECT_HOME=str(work / "prefect-home"), RLHF_CACHE_DIR=str(work / "cache"),
               PYTHONPATH=str(ROOT), PREFECT_LOGGING_LEVEL="INFO", **extra)
    return env


# -------------------------------------------------------------------------------------------- the store


def manifests(root: Path) -> dict[str, dict]:
    return {m["stage"]: m for m in (json.loads(p.read_text()) for p in root.glob("*/*/manifest.json"))}


def in_progress(root: Path) -> list[str]:
    """Stages whose lease is taken and whose output is not complete yet."""
    done = manifests(root)
    return [s for s in STAGES if list((root / "_leases").glob(f"{s}-*.json")) and s not in done]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(ref: Path, got: Path) -> list[str]:
    """What differs between two stores' outputs (empty: identical files under identical keys)."""
    a, b = manifests(ref), manifests(got)
    diffs = []
    for stage in STAGES:
        if stage not in b:
            diffs.append(f"{stage}: no output")
            continue
        if a[stage]["key"] != b[stage]["key"]:
            diffs.append(f"{stage}: key {b[stage]['key']} != {a[stage]['key']}")
        fa = {f["path"]: f["sha256"] for f in a[stage]["files"]}
        fb = {f["path"]: f["sha256"] for f in b[stage]["files"]}
        differ = sorted(p for p in fa.keys() | fb.keys() if fa.get(p) != fb.get(p))
        if differ:
            diffs.append(f"{stage}: files differ {differ[:4]}")
    if "export" in b:  # the files on disk, not only the manifest's word for them
        folder = got / "export" / b["export"]["key"]
        bad = [f["path"] for f in b["export"]["files"] if sha256(folder / f["path"]) != f["sha256"]]
        if bad:
            diffs.append(f"export: files on disk differ from their manifest {bad[:4]}")
    if "evaluate" in b:
        ma = (ref / "evaluate" / a["evaluate"]["key"] / "metrics.json").read_bytes()
        mb = (got / "evaluate" / b["evaluate"]["key"] / "metrics.json").read_bytes()
        if ma != mb:
            diffs.append("evaluate: metrics.json differs")
    return diffs


class Timeline(threading.Thread):
    """When each stage's lease, worker and manifest first appear in a run (seconds from start)."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root, self.t0, self.seen = root, time.monotonic(), {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            now = time.monotonic() - self.t0
            done = manifests(self.root) if self.root.exists() else {}
            for s in STAGES:
                if list((self.root / "_leases").glob(f"{s}-*.json")):
                    self.seen.setdefault(f"{s}:lease", now)
                if s in done:
                    self.seen.setdefault(f"{s}:manifest", now)
                if s in WORKER_STAGES:
                    if worker_pid(str(self.root), s):
                        self.seen.setdefault(f"{s}:worker", now)
                        self.seen[f"{s}:worker_last"] = now

    def window(self, stage: str, target: str) -> float:
        """How long the thing a trial kills lives in an uninterrupted run (its lease or its worker)."""
        if target == "worker":
            return self.seen[f"{stage}:worker_last"] - self.seen[f"{stage}:worker"]
        return self.seen[f"{stage}:manifest"] - self.seen.get(f"{stage}:lease", self.seen[f"{stage}:manifest"])


def wait_for(predicate, run: Run, timeout: float = RUN_TIMEOUT, every: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; None if the run ended or time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.proc.poll() is None:
        found = predicate()
        if found:
            return found
        time.sleep(every)
    return None


# ---------------------------------------------------------------------------------------- (a) kill


def cmd_kill(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="faults-kill-"))
    env = env_for(work)
    ref_root = work / "reference"
    timeline = Timeline(ref_root)
    timeline.start()
    ref = Run(str(ref_root), work / "reference.log", env)
    code = ref.wait()
    timeline.done.set()
    timeline.join()
    if code != 0:
        sys.exit(f"the reference run failed ({work / 'reference.log'}):\n" + ref.text()[-4000:])
    print(f"reference: {ref.seconds:.0f} s; stage windows (s): " + ", ".join(
        f"{s} {timeline.window(s, 'rlhf'):.1f}" + (f"/worker {timeline.window(s, 'worker'):.1f}" if s in WORKER_STAGES else "")
        for s in STAGES), flush=True)

    plan = [(s, "rlhf") for s in STAGES] + [(s, "worker") for s in WORKER_STAGES]
    if args.plan:
        plan = [tuple(p.split("/")) for p in args.plan.split(",")]
    trials, misses = [], []
    for i in range(args.trials):
        stage, target = plan[i % len(plan)]
        # A stage may run faster now than in the reference (the machine's load changes): a kill that comes
        # after the stage ended is not a trial of it. Try again, sooner, up to 4 times.
        window = timeline.window(stage, target)
        for attempt in range(4):
            trial = kill_trial(i, attempt + 1, stage, target, window, ref_root, work, env, rng)
            print(json.dumps(trial), flush=True)
            if trial["landed_in_stage"]:
                break
            misses.append(trial)
            window /= 2
        trials.append(trial)
    result = {"command": "kill", "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
              "loadavg_at_end": os.getloadavg(), "cheap": CHEAP, "reference_s": round(ref.seconds, 1),
              "windows_s": {f"{s}/{t}": round(timeline.window(s, t), 2) for s, t in plan}, "trials": trials,
              "missed_attempts": misses, "work": str(work)}
    rows = {}
    for t in trials:
        row = rows.setdefault((t["stage"], t["target"]), {"trials": 0, "landed": 0, "passed": 0, "failed": [],
                                                          "missed": 0})
        row["trials"] += 1
        row["landed"] += t["landed_in_stage"]
        row["missed"] += t["attempt"] - 1
        row["passed"] += t["passed"]
        if not t["passed"]:
            row["failed"].append(t["why"])
    print(f"\n(a) SIGKILL at a random time in a stage, then resumed; reference {ref.seconds:.0f} s, {len(trials)} trials")
    print("| stage | killed | trials | kill landed in the stage | passed | failures (why) | attempts that came after "
          "the stage ended (run again, sooner) |")
    print("|---|---|---|---|---|---|---|")
    for (stage, target), r in rows.items():
        print(f"| {stage} | {target} | {r['trials']} | {r['landed']} | {r['passed']} | {'; '.join(r['failed']) or '-'} "
              f"| {r['missed']} |")
    print(f"| all | | {len(trials)} | {sum(t['landed_in_stage'] for t in trials)} | "
          f"{sum(t['passed'] for t in trials)} | {sum(not t['passed'] for t in trials)} | {len(misses)} |")
    return result


def kill_trial(i: int, attempt: int, stage: str, target: str, window: float, ref_root: Path, work: Path, env: dict,
               rng: random.Random) -> dict:
    name = f"trial-{i:02d}-{attempt}"  # a fresh store for every attempt
    root = work / name
    run = Run(str(root), work / f"{name}.log", env)
    trial = {"trial": i, "attempt": attempt, "stage": stage, "target": target}
    try:
        if target == "worker":
            started = wait_for(lambda: worker_pid(str(root), stage), run)
        else:
            started = wait_for(lambda: list((root / "_leases").glob(f"{stage}-*.json")), run, every=0.01)
        delay = rng.uniform(0, 0.9 * window)
        time.sleep(delay)
        busy = in_progress(root)
        victim = worker_pid(str(root), stage) if target == "worker" else run.proc.pid
        if started and victim:
            os.kill(victim, signal.SIGKILL)
        trial.update(delay_s=round(delay, 2), in_progress=busy, killed=bool(started and victim),
                     landed_in_stage=bool(started and victim) and stage in busy)
        if target == "rlhf":
            run.wait()
            time.sleep(2)  # the reaper's SIGTERM and a worker's exit
            left = survivors(str(root), run.port)
            deadline = time.monotonic() + 15
            while left and time.monotonic() < deadline:
                time.sleep(0.5)
                left = survivors(str(root), run.port)
            trial["survivors"] = left
            run.cleanup()
            resumed = Run(str(root), work / f"{name}.resume.log", env)
            code = resumed.wait()
            text = resumed.text()
            trial.update(exit=code, resume_s=round(resumed.seconds, 1), waited_for_lease="waiting for " in text,
                         took_over=text.count("took over from a holder"))
        else:
            code = run.wait()
            trial["survivors"] = []
            trial.update(exit=code, run_s=round(run.seconds, 1),
                         retried=run.text().count("launching " + stage + ":"))
            if code == 0:
                again = Run(str(root), work / f"{name}.rerun.log", env)
                again.wait()
                states = again.task_states()
                trial["rerun_states"] = sorted(set(states.values()))
                trial["rerun_all_cached"] = len(states) == 6 and set(states.values()) == {"Cached"}
        diffs = compare(ref_root, root) if code == 0 else ["run failed"]
        leftovers = [p.name for p in (root / "_leases").glob("*")] if (root / "_leases").exists() else []
        trial.update(differences=diffs, leases_left=leftovers)
        why = []
        if code != 0:
            why.append(f"exit {code}")
        if trial["survivors"]:
            why.append(f"{len(trial['survivors'])} processes outlived rlhf")
        if trial.get("waited_for_lease"):
            why.append("the re-run waited for a lease")
        if trial.get("rerun_all_cached") is False:
            why.append(f"re-run not all Cached: {trial['rerun_states']}")
        why += diffs
        if leftovers:
            why.append(f"leases left: {leftovers}")
        if not trial["landed_in_stage"]:
            why.append("the kill came after the stage ended")
        trial.update(passed=not why, why="; ".join(why))
    finally:
        run.cleanup()
    return trial


# ------------------------------------------------------------------------------------------- (b) S3


class Endpoint:
    """A TCP front for a local S3 server that can die abruptly (listening socket closed, every open
    connection reset) and come back on the same port."""

    def __init__(self, backend: tuple[str, int]):
        self.backend = backend
        self.port = 0
        self.listener: socket.socket | None = None
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()

    def start(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # killed
            try:
                upstream = socket.create_connection(self.backend)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def kill(self) -> None:
        assert self.listener is not None
        self.listener.close()
        with self.lock:
            for s in self.conns:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close = RST
                    s.close()
                except OSError:
                    pass
            self.conns.clear()


def cmd_s3(args: argparse.Namespace) -> dict:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="faults-s3-"))
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    endpoint = Endpoint(moto.get_host_and_port())
    endpoint.start()
    key_id = "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    secret = base64.b64encode(secrets.token_bytes(30)).decode()
    env = env_for(work, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{endpoint.port}")
    s3 = boto3.client("s3", endpoint_url="http://%s:%d" % moto.get_host_and_port(), region_name="us-east-1",
                      aws_access_key_id=key_id, aws_secret_access_key=secret)
    s3.create_bucket(Bucket="faults")
    store = "s3://faults/rlhf"
    logs: list[Path] = []

    def run(name: str, sets: list[str] = ()) -> Run:
        logs.append(work / f"{name}.log")
        return Run(store, logs[-1], env, list(sets))

    def objects(prefix: str = "") -> dict[str, str]:
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="faults", Prefix=prefix):
            out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
        return out

    steps = []
    first = run("fresh")
    code = first.wait()
    steps.append({"step": "fresh run", "exit": code, "s": round(first.seconds, 1)})
    if code != 0:
        sys.exit(first.text()[-4000:])
    before = {k: v for k, v in objects().items() if "/_leases/" not in k}
    again = run("cached")
    code = again.wait()
    states = again.task_states()
    after = {k: v for k, v in objects().items() if "/_leases/" not in k}
    steps.append({"step": "re-run", "exit": code, "s": round(again.seconds, 1), "states": states,
                  "all_cached": len(states) == 6 and set(states.values()) == {"Cached"},
                  "objects_unchanged": before == after})

    trials = []
    for i in range(args.trials):
        sets = [f"models.actor.init_seed={10 + i}"]  # a new actor: sft, rl, export and evaluate to run
        stage = ["sft", "rl", "evaluate"][i % 3]
        killed = run(f"trial-{i}-outage", sets)
        took = wait_for(lambda: objects(f"rlhf/_leases/{stage}-"), killed, every=0.1)
        if stage == "evaluate":  # no checkpoints: anywhere in its first seconds (worker start, sampling)
            delay = rng.uniform(0, 10)
        else:  # training: after its first checkpoint, so that the next run has one to resume from
            wait_for(lambda: [k for k in objects(f"rlhf/{stage}/") if "/checkpoints/" in k and k.endswith("/COMPLETE")],
                     killed, every=0.1)
            delay = rng.uniform(0, 1.5)
        time.sleep(delay)
        manif_before = {k for k in objects() if k.endswith("/manifest.json")}
        endpoint.kill()
        t_kill = time.monotonic()
        code = killed.wait(timeout=900)
        error_after = time.monotonic() - t_kill
        text = killed.text()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        endpoint.start()  # the store is back, with what it held
        # What a reader sees: every manifest's files present with their hashes; none for unfinished stages.
        visible = [k for k in objects() if k.endswith("/manifest.json")]
        incomplete = []
        for k in visible:
            m = json.loads(s3.get_object(Bucket="faults", Key=k)["Body"].read())
            folder = k.rsplit("/", 1)[0]
            have = objects()
            incomplete += [f"{folder}/{f['path']}" for f in m["files"] if f"{folder}/{f['path']}" not in have]
        new_manifests = sorted(set(visible) - manif_before)
        resumed = run(f"trial-{i}-resume", sets)
        rcode = resumed.wait()
        cached = run(f"trial-{i}-cached", sets)
        cached.wait()
        cstates = cached.task_states()
        trial = {
            "trial": i, "stage": stage, "lease_seen": bool(took), "delay_s": round(delay, 2),
            "exit": code, "error_after_s": round(error_after, 1),
            "error_lines": [ln[:400] for ln in lines if ln.startswith("rlhf: ") and not SERVER_UP.match(ln)],
            "last_lines": [ln[:200] for ln in lines[-2:]], "tracebacks": text.count("Traceback (most recent call last)"),
            "manifests_written_during_outage": new_manifests, "manifests_missing_files": incomplete,
            "resume_exit": rcode, "resume_s": round(resumed.seconds, 1),
            "resumed_from_checkpoint": "resumed from checkpoint" in resumed.text(),
            "rerun_all_cached": len(cstates) == 6 and set(cstates.values()) == {"Cached"},
        }
        why = []
        if code in (0, None):
            why.append("the run did not fail" if code == 0 else "the run hung")
        # One "rlhf: ..." line, at the end (Prefect's "Stopping temporary server" may follow it).
        if len(trial["error_lines"]) != 1 or not any(ln.startswith("rlhf: ") for ln in lines[-2:]):
            why.append("no one-line rlhf: error at the end")
        if trial["tracebacks"]:
            why.append(f"{trial['tracebacks']} tracebacks printed")
        if incomplete:
            why.append("a manifest names files that are not there")
        if rcode != 0:
            why.append(f"the next run failed (exit {rcode})")
        if not trial["rerun_all_cached"]:
            why.append(f"re-run not all Cached: {cstates}")
        trial.update(passed=not why, why="; ".join(why))
        trials.append(trial)
        print(json.dumps(trial), flush=True)

    # Credentials: in no log, no object of the bucket, nothing under the Prefect home or the caches.
    hits = []
    needles = [key_id.encode(), secret.encode()]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="faults"):
        for o in page.get("Contents", []):
            body = s3.get_object(Bucket="faults", Key=o["Key"])["Body"].read()
            hits += [f"s3://faults/{o['Key']}" for n in needles if n in body]
    for path in work.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [str(path) for n in needles if n in data]
    result = {"command": "s3", "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
              "loadavg_at_end": os.getloadavg(), "cheap": CHEAP, "steps": steps, "trials": trials,
              "credential_hits": hits, "files_searched": sum(1 for p in work.rglob("*") if p.is_file()),
              "objects_searched": len(objects()), "work": str(work)}
    endpoint.kill()
    moto.stop()
    print("\n(b) the tiny pipeline on a local S3 (moto) that dies mid-run")
    print(f"fresh run {steps[0]['s']:.0f} s; re-run {steps[1]['s']:.0f} s, all six Cached: {steps[1]['all_cached']}, "
          f"no object changed: {steps[1]['objects_unchanged']}")
    print("| trial | store killed in | error after s | error line | tracebacks | partial output visible | next run | "
          "re-run all Cached | passed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in trials:
        said = t["error_lines"][0][:110] + "..." if t["error_lines"] else "(none)"
        print(f"| {t['trial']} | {t['stage']} | {t['error_after_s']} | `{said}` | {t['tracebacks']} | "
              f"{bool(t['manifests_missing_files'])} | exit {t['resume_exit']}, {t['resume_s']:.0f} s"
              f"{', resumed from a checkpoint' if t['resumed_from_checkpoint'] else ''} | {t['rerun_all_cached']} | "
              f"{t['passed'] or t['why']} |")
    print(f"credentials (key id and secret) found in {len(hits)} of {result['files_searched']} files and "
          f"{result['objects_searched']} objects searched")
    print(f"| trials | passed | failed |\n|---|---|---|\n| {len(trials)} | {sum(t['passed'] for t in trials)} | "
          f"{sum(not t['passed'] for t in trials)} |")
    return result


# ------------------------------------------------------------------------------------ (c) shared reward


def cmd_shared_reward(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="faults-shared-"))
    env = env_for(work)
    alone = work / "alone"
    ref = Run(str(alone), work / "alone.log", env)
    ref.wait()
    reward_ref = manifests(alone)["reward"]
    actors = [["models.actor.init_seed=5"], ["models.actor.init_seed=6", "models.actor.architecture.num_hidden_layers=3"]]
    trials, misses = [], []
    for i in range(args.trials):
        # After the reward stage's first checkpoint, within a second: a kill that comes after the stage ended
        # (it ran faster than that) is not a trial of it; try again, sooner, up to 4 times (fresh stores).
        window = 1.0
        for attempt in range(1, 5):
            trial = shared_trial(i, attempt, window, actors, reward_ref, work, env, rng)
            print(json.dumps(trial), flush=True)
            if trial["killed"]:
                break
            misses.append(trial)
            window /= 2
        trials.append(trial)
    result = {"command": "shared-reward", "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
              "loadavg_at_end": os.getloadavg(), "cheap": CHEAP, "trials": trials, "missed_attempts": misses,
              "work": str(work)}
    print("\n(c) two actors, one reward model, the reward lease's holder SIGKILLed")
    print("| trial | took over after s | reward worker launches | resumed from | other run | killed run re-run | "
          "same reward as alone | passed |")
    print("|---|---|---|---|---|---|---|---|")
    for t in trials:
        print(f"| {t['trial']} | {t['took_over_after_s']} | {t['reward_launches']} | {t['resumed_from']} | "
              f"exit {t['other_exit']} ({t['other_s']:.0f} s) | exit {t['rerun_exit']}, reward "
              f"{t['rerun_reward_state']} | {t['same_reward_as_alone']} | {t['passed'] or t['why']} |")
    print(f"| trials | passed | failed | attempts whose kill came after the reward stage ended (run again) |\n"
          f"|---|---|---|---|\n| {len(trials)} | {sum(t['passed'] for t in trials)} | "
          f"{sum(not t['passed'] for t in trials)} | {len(misses)} |")
    return result


def shared_trial(i: int, attempt: int, window: float, actors: list[list[str]], reward_ref: dict, work: Path,
                 env: dict, rng: random.Random) -> dict:
    name = f"trial-{i}-{attempt}"
    root = work / name
    runs = [Run(str(root), work / f"{name}-{n}.log", env, actors[n]) for n in range(2)]
    first = runs[0]
    lease = wait_for(lambda: list((root / "_leases").glob("reward-*.json")), first, every=0.05)
    key = lease[0].name[len("reward-"):-len(".json")] if lease else None
    ckpt = wait_for(lambda: list((root / "reward" / str(key) / "checkpoints").glob("step-*/COMPLETE")), first,
                    every=0.05)
    delay = rng.uniform(0, window)
    time.sleep(delay)
    record = json.loads(lease[0].read_text()) if lease and lease[0].exists() else None
    holder = next((r for r in runs if record and r.proc.pid == record["process"]["pid"]), None)
    t_kill = time.time()
    killed = holder is not None and not (root / "reward" / str(key) / "manifest.json").exists()
    if killed:
        holder.kill()
    other = next(r for r in runs if r is not holder)
    code_holder = holder.wait() if holder else None
    code_other = other.wait()
    taken = re.search(r"(\d\d:\d\d:\d\d\.\d+) \| INFO .*took over from a holder that is gone", other.text())
    rerun = Run(str(root), work / f"{name}-rerun.log", env, actors[runs.index(holder)] if holder else [])
    code_rerun = rerun.wait()
    reward = manifests(root).get("reward")
    launches = sum(r.text().count("launching reward:") for r in (*runs, rerun))
    took_over_after = None
    if taken:
        hms = datetime.datetime.strptime(taken.group(1), "%H:%M:%S.%f").time()
        took_over_after = round((datetime.datetime.combine(datetime.date.today(), hms).timestamp() - t_kill), 1)
    trial = {
        "trial": i, "attempt": attempt, "delay_s": round(delay, 2), "checkpoint_seen": bool(ckpt), "killed": killed,
        "holder_exit": code_holder, "other_exit": code_other, "rerun_exit": code_rerun,
        "took_over_after_s": took_over_after, "reward_launches": launches,
        "resumed_from": reward["metrics"].get("resumed_from") if reward else None,
        "rerun_reward_state": rerun.task_states().get("train-reward"),
        "same_reward_as_alone": bool(reward) and reward["key"] == reward_ref["key"] and
        sorted((f["path"], f["sha256"]) for f in reward["files"]) == sorted((f["path"], f["sha256"]) for f in reward_ref["files"]),
        "other_s": round(other.seconds, 1),
    }
    why = []
    if not killed:
        why.append("the kill came after the reward stage ended")
    if code_other is None or code_rerun is None:
        why.append("a run hung")
    elif code_other or code_rerun:
        why.append(f"exit {code_other}/{code_rerun}")
    if killed and took_over_after is None:
        why.append("the other run never took over")
    elif killed and took_over_after > 60:
        why.append(f"took over only after {took_over_after} s")
    if killed and launches != 2:
        why.append(f"reward worker launched {launches} times")
    if killed and not trial["resumed_from"]:
        why.append("trained from scratch, not resumed")
    if trial["rerun_reward_state"] != "Cached":
        why.append(f"the killed run's re-run: reward {trial['rerun_reward_state']}")
    if not trial["same_reward_as_alone"]:
        why.append("reward model differs from a run alone")
    trial.update(passed=not why, why="; ".join(why))
    for r in (*runs, rerun):
        r.cleanup()
    return trial


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, fn, trials in (("kill", cmd_kill, 20), ("s3", cmd_s3, 3), ("shared-reward", cmd_shared_reward, 3)):
        p = sub.add_parser(name)
        p.add_argument("--trials", type=int, default=trials)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--keep", action="store_true", help="keep the work folder (stores and logs)")
        if name == "kill":
            p.add_argument("--plan", help="trials to cycle through, e.g. rl/rlhf,sft/worker (default: every stage, "
                           "rlhf and, for worker stages, worker)")
        p.set_defaults(fn=fn)
    args = ap.parse_args()
    result = args.fn(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"faults_{args.command.replace('-', '_')}_{result['date']}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out.relative_to(ROOT)}")
    if not args.keep:
        shutil.rmtree(result["work"], ignore_errors=True)


if __name__ == "__main__":
    main()
