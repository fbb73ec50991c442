"""Running a sweep: every unfinished grid point, `workers` processes at a time, skipped when
finished, resumed when not, failures recorded, Ctrl-C stopping the children; one sweep per root.

CPU threads: in JAX 0.10 the XLA:CPU runtime sizes its thread pool from the process's CPU affinity
mask; `--xla_cpu_multi_thread_eigen=false` and `intra_op_parallelism_threads=1` in XLA_FLAGS change
nothing (measured: same threads and CPU time). With several workers, each worker's runs are therefore
pinned to a disjoint share of the cores (`os.sched_setaffinity`), and OMP/BLAS thread counts are set
to the share size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from fedmoe_jax.files import SUMMARY_FILE as SUMMARY
from fedmoe_jax.tools.sweeps.configs import check_configs
from fedmoe_jax.tools.sweeps.results import _counts, collect, read_sweep_json, write_sweep_json, write_tables
from fedmoe_jax.tools.sweeps.spec import Job, Run, SweepSpec, expand, jobs
from fedmoe_jax.tools.sweeps.values import SpecError

LOG = "log.txt"
LOCK = ".sweep.lock"
EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 1, 2, 130
SIGNAL_EXITS = (128 + 2, 128 + 15)  # a run stopped by SIGINT / SIGTERM after checkpointing (main.py)
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def core_shares(workers: int, cores: Sequence[int] | None = None) -> list[list[int]] | None:
    """Disjoint, near-equal core sets per worker slot (one shared core each when workers > cores);
    None when there is nothing to split (one worker, or no CPU affinity on this OS)."""
    if cores is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        cores = sorted(os.sched_getaffinity(0))
    if workers <= 1 or not cores:
        return None
    c = len(cores)
    if workers > c:
        return [[cores[i % c]] for i in range(workers)]
    return [list(cores[i * c // workers:(i + 1) * c // workers]) for i in range(workers)]


@contextlib.contextmanager
def _pinned(cores: Sequence[int] | None) -> Iterator[None]:
    """Pin the calling thread while a child is spawned: the child inherits the mask, no race."""
    if not cores:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def child_env(workers: int, share: Sequence[int] | None, base: Mapping[str, str] | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    if workers > 1:
        threads = len(share) if share else max(1, (os.cpu_count() or 1) // workers)
        for var in THREAD_ENV:
            env.setdefault(var, str(threads))
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPUs: do not grab 75 % each
    return env


def last_line(path: str, offset: int = 0) -> str:
    """The last non-empty line written after `offset` (tqdm's carriage returns split lines too)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return lines[-1][:500] if lines else ""


@dataclasses.dataclass
class _Active:
    job: Job
    proc: subprocess.Popen
    log: io.BufferedWriter
    offset: int
    start: float


@dataclasses.dataclass
class SweepReport:
    records: list[dict]
    exit_code: int
    interrupted: bool = False

    def counts(self) -> dict[str, int]:
        return _counts(self.records)


def _record(run: Run, status: str = "pending") -> dict:
    return {"name": run.name, "arg": run.arg, "params": run.params, "command": run.command,
            "status": status, "returncode": None, "error": "", "seconds": None}


@contextlib.contextmanager
def _lock(root: str) -> Iterator[None]:
    """One sweep at a time per root (two would run the same directories); a stale lock is taken."""
    path = os.path.join(root, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
                os.kill(pid, 0)
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    os.remove(path)
                continue
            raise SpecError(f"another sweep (pid {pid}) is running on {root}; wait for it, or remove {path} "
                            "if that process is not a sweep") from None
    else:
        raise SpecError(f"cannot take the lock {path}")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def _stop(active: Sequence[_Active], grace: float) -> None:
    """SIGTERM each run's process group, SIGKILL what is left after `grace` seconds."""
    def signal_all(sig):
        for a in active:
            if a.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(a.proc.pid, sig)

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        for a in active:
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass
    signal_all(signal.SIGKILL)
    for a in active:
        a.proc.wait()
        a.log.close()


def run_sweep(spec: SweepSpec, workers: int = 1, *, rerun: bool = False, pin_cpus: bool = True,
              progress: bool = True, grace: float = 10.0, poll: float = 0.1,
              validator: Callable[[Any], None] | None = None, validate: bool = True) -> SweepReport:
    """Run every grid point not finished yet, `workers` at a time; write sweep.json and the tables.

    Finished runs (summary.json present) are skipped unless `rerun`; the others are (re)started with
    the same command, which resumes them. A failed run is recorded (exit code, last log line) and the
    others go on. Ctrl-C (KeyboardInterrupt) terminates the running children and returns with
    `interrupted=True`. Exit code: 0 all finished, 1 some failed, 130 interrupted."""
    from tqdm import tqdm

    if workers < 1:
        raise SpecError(f"workers must be >= 1, got {workers}")
    runs = expand(spec)
    if validate:
        check_configs(spec, runs, validator)
    os.makedirs(spec.root, exist_ok=True)
    shares = core_shares(workers) if pin_cpus else None
    records = {r.name: _record(r) for r in runs}
    previous = {r["name"]: r for r in (read_sweep_json(spec.root) or {}).get("runs", [])}
    changed = 0
    queue: deque[Job] = deque()
    active: dict[int, _Active] = {}
    interrupted = False
    with _lock(spec.root), tqdm(total=len(runs), unit="run", desc="sweep", disable=not progress,
                                dynamic_ncols=True) as bar:

        def show():
            c = _counts(list(records.values()))
            bar.set_postfix({"done": c["done"], "skipped": c["skipped"], "failed": c["failed"],
                             "running": len(active)})

        for run in runs:
            if run.finished() and not rerun:
                records[run.name]["status"] = "skipped"
                old = previous.get(run.name)
                changed += bool(old and old.get("command") and old["command"] != run.command)
                bar.update(1)
        queue.extend(jobs(spec, [r for r in runs if records[r.name]["status"] == "pending"]))
        if changed:
            tqdm.write(f"sweep: {changed} finished run(s) were made by a different command (changed 'set' or "
                       "runner?); skipped anyway: pass --rerun to run them again", file=sys.stderr)
        show()
        write_sweep_json(spec, list(records.values()))
        try:
            while queue or active:
                for slot in range(workers):
                    if slot in active or not queue:
                        continue
                    job = queue.popleft()
                    share = shares[slot] if shares else None
                    stamp = datetime.datetime.now().isoformat(timespec="seconds")
                    for run in job.runs[1:]:
                        os.makedirs(run.workdir, exist_ok=True)
                        with open(os.path.join(run.workdir, LOG), "ab") as other:
                            other.write(f"=== sweep {stamp}: seeds vectorized; output in "
                                        f"{os.path.join(job.log_dir, LOG)}\n".encode())
                    os.makedirs(job.log_dir, exist_ok=True)
                    log = open(os.path.join(job.log_dir, LOG), "ab")  # closed when the job ends or is stopped
                    log.write(f"=== sweep {stamp}: {shlex.join(job.command)}\n".encode())
                    log.flush()
                    offset = log.tell()
                    with _pinned(share):
                        proc = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=child_env(workers, share),
                                                start_new_session=True)
                    active[slot] = _Active(job, proc, log, offset, time.monotonic())
                    for run in job.runs:
                        records[run.name]["status"] = "running"
                        if len(job.runs) > 1:
                            records[run.name]["command"] = job.command
                    show()
                time.sleep(poll)
                for slot, a in list(active.items()):
                    rc = a.proc.poll()
                    if rc is None:
                        continue
                    del active[slot]
                    a.log.close()
                    for run in a.job.runs:
                        rec = records[run.name]
                        rec.update(returncode=rc, seconds=round(time.monotonic() - a.start, 2))
                        if rc == 0 and run.finished():
                            rec.update(status="done", error="")
                        else:
                            reason = last_line(os.path.join(a.job.log_dir, LOG), a.offset) or "(no output)"
                            if rc == 0:
                                reason = f"exited 0 without writing {SUMMARY}; last line: {reason}"
                            # stopped by SIGTERM / SIGINT after a checkpoint: resumable, not failed
                            status = "interrupted" if rc in SIGNAL_EXITS else "failed"
                            rec.update(status=status, error=reason)
                            tqdm.write(f"sweep: {run.name} {status} (exit {rc}): {reason}", file=sys.stderr)
                        bar.update(1)
                    show()
                    write_sweep_json(spec, list(records.values()))
        except KeyboardInterrupt:
            interrupted = True
            tqdm.write(f"sweep: interrupted; stopping {len(active)} process(es)", file=sys.stderr)
            _stop(list(active.values()), grace)
            for a in active.values():
                for run in a.job.runs:
                    finished = a.proc.returncode == 0 and run.finished()  # ended during the grace period
                    records[run.name].update(status="done" if finished else "interrupted",
                                             returncode=a.proc.returncode,
                                             seconds=round(time.monotonic() - a.start, 2))
            active.clear()
        finally:
            for rec in records.values():
                if rec["status"] == "running":  # an unexpected error while children ran
                    rec["status"] = "interrupted"
            if active:
                _stop(list(active.values()), grace)
            write_sweep_json(spec, list(records.values()))
            write_tables(spec, collect(spec, runs, list(records.values())))
    recs = list(records.values())
    failed = any(r["status"] == "failed" for r in recs)
    code = EXIT_INTERRUPTED if interrupted else EXIT_FAILED if failed else 0
    return SweepReport(recs, code, interrupted)
