"""The hang watchdog: a job whose steps stop ending is ended with every live rank's Python stacks, instead of sitting
until its time limit.

Every rank of a watched task (the engine's train loop, the sensitivity scan's per-layer array tasks) calls `beat(step)`
when a step (a layer, an item) ends; that only updates memory. A daemon thread per rank writes the rank's heartbeat,
`<run dir>/heartbeat/<job>-r<restart>/rank<R>.json` (its last step, when it ended, the rank's current limit, and
`alive`: when the thread last ran), and reads every other rank's. Files rather than a collective, because the ranks
that must notice a hang are the ones blocked in a collective (a rank stopped with SIGSTOP, a dead node, a deadlock
leave the others waiting inside an all-reduce that never returns, and a second collective from a thread would queue
behind it), and the run folder is on the filesystem every node shares (checkpoints need it already). The cost is one
small write per rank per poll, none on the training path.

A rank's limit: `hang.first_step_s` while it loads (from the watchdog's start to the first step's end) and inside
slow phases (checkpoint saves); afterwards `max(hang.factor x the p95 of its step times, hang.floor_s)`. When any rank
has not ended a step within its limit, the first watchdog to see it writes `<run dir>/hang/<job>/HANG` (the cause);
every live rank's watchdog then writes all its threads' stacks to `<run dir>/hang/<job>/rank<R>.txt`, prints
`[medhpc] failure hang: <cause>` (core.failure_mark) and ends its process with exit code 1 (srun's
--kill-on-bad-exit ends the rest). A rank that cannot write (stopped, its node gone) is named in the cause and in its
own rank<R>.txt by the rank that fired, with its last heartbeat and step.

Backstops: the process group's collective timeout follows the same figure plus a grace (`collective_timeout_s`), so a
rank blocked in a collective ends even without the watchdog; and each poll re-arms Python's
`faulthandler.dump_traceback_later(limit + grace, exit=True)`, so a watchdog thread starved of the GIL still ends the
process with its stacks in the task log.

Test hooks (inert unless MEDHPC_FAULT names them; several faults are separated by commas):
`stop@rank<R>:step<S>` makes rank R stop itself with SIGSTOP once step S has ended (a real stopped process).
Nothing here imports torch at import time (the plan reads `describe`).
"""
from __future__ import annotations

import faulthandler
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from core import failure_mark
from core.run_folder import write_text_atomic

log = logging.getLogger("watchdog")

HEARTBEAT_DIR = "heartbeat"
HANG_DIR = "hang"
HANG_FILE = "HANG"
EXIT_CODE = 1
_HB_BYTES = 1024  # heartbeats are written in place, padded to one size: a reader never sees an empty file


def faults(environ: Optional[dict] = None) -> list[str]:
    """The fault points MEDHPC_FAULT names (comma-separated); empty unless a test sets it."""
    spec = (os.environ if environ is None else environ).get("MEDHPC_FAULT", "")
    return [f.strip() for f in spec.split(",") if f.strip()]


# ---------------------------------------------------------------- figures (torch-free: the plan prints them)
@dataclass(frozen=True)
class Limits:
    factor: float = 10.0
    floor_s: float = 300.0
    first_step_s: float = 1800.0
    enabled: bool = True

    @classmethod
    def of(cls, spec) -> "Limits":
        h = getattr(spec, "hang", None)
        if h is None:
            return cls()
        return cls(float(h.factor), float(h.floor_s), float(h.first_step_s), bool(h.enabled))

    @property
    def poll_s(self) -> float:
        """How often each rank's watchdog writes its heartbeat and looks at the others'."""
        return min(10.0, max(0.5, self.floor_s / 10))

    @property
    def grace_s(self) -> float:
        """What the watchdog needs past a limit to notice, write the stacks and end the job: the collective timeout
        and the faulthandler backstop wait this much longer, so the watchdog speaks first."""
        return 5.0 + 5 * self.poll_s   # a poll to notice, up to 3 polls + 5 s waiting for the peers' stacks, a poll spare

    def step_limit(self, p95: Optional[float]) -> float:
        return self.first_step_s if p95 is None else max(self.factor * p95, self.floor_s)

    def collective_timeout_s(self, limit: Optional[float] = None) -> int:
        """The process group's timeout: the watchdog's current limit (the first-step allowance at start) + grace."""
        return int(math.ceil((self.first_step_s if limit is None else limit) + self.grace_s))


def describe(spec, what: str = "step") -> str:
    """The plan's line about the watchdog of this spec."""
    lim = Limits.of(spec)
    if not lim.enabled:
        return "hang watchdog: off (hang.enabled: false): a hung job runs until its time limit"
    return (f"hang watchdog: every rank reports each {what} under <run>/{HEARTBEAT_DIR}/\n"
            f"a {what} must end within max({lim.factor:g} x p95 {what} time, {lim.floor_s:g} s), the first (with "
            f"loading) and checkpoint saves within {lim.first_step_s:g} s\n"
            f"collective timeout {lim.collective_timeout_s()} s at start, then the {what} limit + {lim.grace_s:g} s\n"
            f"a hang ends the job (class hang) with every live rank's stacks in <run>/{HANG_DIR}/<job>/rank<R>.txt")


def percentile(values, q: float) -> Optional[float]:
    """The q-th percentile (nearest rank) of the values; None when there are none."""
    vals = sorted(values)
    if not vals:
        return None
    return vals[max(0, math.ceil(q / 100 * len(vals)) - 1)]


# ---------------------------------------------------------------- files
def heartbeat_dir(run_dir: Path, job_id: str, restart: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"{safe_name(job_id)}-r{int(restart)}"


def hang_dir(run_dir: Path, job_id: str, restart: int = 0) -> Path:
    """`<run dir>/hang/<job>/` (`<job>-r<N>` after the scheduler's N-th requeue of the same job id)."""
    return Path(run_dir) / HANG_DIR / (safe_name(job_id) + (f"-r{int(restart)}" if restart else ""))


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(text))[:100] or "job"


def read_heartbeat(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_padded(path: Path, data: dict) -> None:
    text = json.dumps(data, sort_keys=True)
    raw = (text + " " * max(0, _HB_BYTES - len(text))).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, raw, 0)
        if len(raw) > _HB_BYTES:
            os.ftruncate(fd, len(raw))
    finally:
        os.close(fd)


def format_stacks(header: str) -> str:
    """Every thread's Python stack in this process, named, innermost call last (as a traceback reads)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = [header.rstrip(), ""]
    main = threading.main_thread().ident
    for ident, frame in sorted(sys._current_frames().items(), key=lambda kv: kv[0] != main):  # the main thread first
        kind = " (daemon)" if any(t.ident == ident and t.daemon for t in threading.enumerate()) else ""
        parts.append(f"--- thread {names.get(ident, '?')} (id {ident}){kind}, most recent call last:")
        parts.append("".join(traceback.format_stack(frame)).rstrip())
        parts.append("")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- the watchdog
class Watchdog:
    """One per rank of a watched task. `ready()` once loading is over, `beat(step)` after every step, `phase(name)`
    around slow collective phases (checkpoint saves), `stop()` when the watched loop is over."""

    def __init__(self, run_dir: Path, job_id: str, rank: int, world_size: int, host: str, limits: Limits,
                 restart: int = 0, what: str = "step", on_limit=None):
        self.run_dir, self.job_id, self.rank, self.world = Path(run_dir), str(job_id), int(rank), int(world_size)
        self.host, self.limits, self.restart, self.what = host, limits, int(restart), what
        self.on_limit = on_limit                 # called with the new collective timeout when the limit moves
        self.on_end: Optional[Callable[[str], None]] = None  # prints the hang mark and decides (else: the mark)
        self.hb_dir = heartbeat_dir(run_dir, job_id, restart)
        self.hang_dir = hang_dir(run_dir, job_id, restart)
        self.started = time.time()
        self.step: Optional[int] = None          # the last step that ended
        self.progress_t = self.started           # when it ended (or the start)
        self.durations: deque = deque(maxlen=200)
        self._lock = threading.Lock()            # the thread reads the step times while the main thread adds one
        self._first: Optional[float] = None      # the first step's time (compile, warm-up): dropped after 5 more
        self._phase: Optional[str] = "start"     # a phase with the first-step allowance, or None
        self._timeout_set: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._fired = False
        self._armed = False                      # faulthandler's backstop timer is set

    # ---- the main thread's side (memory only, except at a fault point)
    def p95(self) -> Optional[float]:
        with self._lock:
            vals = list(self.durations)
        if self._first is not None and len(vals) < 5:
            vals.append(self._first)
        return percentile(vals, 95)

    def limit(self) -> float:
        if self._phase is not None:
            return self.limits.first_step_s
        return self.limits.step_limit(self.p95())

    def ready(self) -> None:
        """Loading is over: the first step starts now (it keeps the first-step allowance)."""
        self.progress_t = time.time()
        self._phase = "first " + self.what

    def beat(self, step: int) -> None:
        now = time.time()
        took = now - self.progress_t
        if self.step is None and self._first is None and self._phase and self._phase.startswith("first"):
            self._first = took
        elif self._phase is None or self.step is not None:
            with self._lock:
                self.durations.append(took)
        self.step, self.progress_t, self._phase = int(step), now, None
        self._follow_limit()
        self._fault(step)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A slow phase every rank goes through (a checkpoint save): the first-step allowance applies inside."""
        before = self._phase
        self._phase = name
        self.progress_t = time.time()
        self._follow_limit()
        try:
            yield
        finally:
            self._phase = before
            self.progress_t = time.time()
            self._follow_limit()

    def _follow_limit(self) -> None:
        if self.on_limit is None:
            return
        timeout = self.limits.collective_timeout_s(self.limit())
        if self._timeout_set is None or abs(timeout - self._timeout_set) > 0.1 * self._timeout_set:
            self._timeout_set = timeout
            self.on_limit(timeout)

    def _fault(self, step: int) -> None:
        if f"stop@rank{self.rank}:{self.what}{step}" in faults():
            self._write_heartbeat()
            log.warning("MEDHPC_FAULT: rank %d stops itself (SIGSTOP) after %s %d", self.rank, self.what, step)
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP)

    # ---- the thread
    def start(self) -> "Watchdog":
        if not self.limits.enabled:
            return self
        self.hb_dir.mkdir(parents=True, exist_ok=True)
        self._write_heartbeat()
        self._thread = threading.Thread(target=self._run, name=f"hang-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The watched loop is over: write a last heartbeat that says so (the others stop watching this rank)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self._armed:  # only the timer this watchdog armed (a test runner may have its own)
            faulthandler.cancel_dump_traceback_later()
            self._armed = False
        if self.limits.enabled and not self._fired:
            self._write_heartbeat(done=True)
        if self.on_limit is not None and self._timeout_set != self.limits.collective_timeout_s():
            self._timeout_set = self.limits.collective_timeout_s()
            self.on_limit(self._timeout_set)

    def _state(self, done: bool = False) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": os.getpid(), "job": self.job_id, "restart": self.restart,
                "step": self.step, "progress_t": self.progress_t, "limit_s": self.limit(), "p95_s": self.p95(),
                "phase": self._phase, "alive_t": time.time(), "done": done}

    def _write_heartbeat(self, done: bool = False) -> None:
        try:
            _write_padded(self.hb_dir / f"rank{self.rank}.json", self._state(done))
        except OSError as e:
            log.warning("heartbeat not written: %s", e)

    def _run(self) -> None:
        poll = self.limits.poll_s
        while not self._stop.wait(poll):
            try:
                self._poll()
            except Exception as e:  # the watchdog must never be the reason a healthy job fails
                log.warning("watchdog poll failed: %s", e)

    def _poll(self) -> None:
        self._write_heartbeat()
        faulthandler.dump_traceback_later(self.limit() + self.limits.grace_s, exit=True)
        self._armed = True
        if (self.hang_dir / HANG_FILE).exists():
            self._join_hang()
            return
        now = time.time()
        view = self.peers(now)
        late = [v for v in view.values() if not v.get("done") and now - v["progress_t"] > v["limit_s"]]
        if late:
            self._fire(view, now)

    def peers(self, now: float) -> dict[int, dict]:
        """Every rank's last heartbeat (this rank's from memory); a rank that never wrote one counts as started when
        this watchdog did, with the first-step allowance."""
        view = {}
        for r in range(self.world):
            if r == self.rank:
                view[r] = self._state()
                continue
            hb = read_heartbeat(self.hb_dir / f"rank{r}.json")
            if hb is None or hb.get("restart") != self.restart:
                hb = {"rank": r, "host": "?", "pid": None, "step": None, "progress_t": self.started,
                      "limit_s": self.limits.first_step_s, "alive_t": None, "phase": "never reported", "done": False}
            view[r] = hb
        return view

    def answering(self, hb: dict, now: float) -> bool:
        """Whether a rank's watchdog thread still runs (its process is not stopped, its node not gone)."""
        quiet = max(3 * self.limits.poll_s, min(5.0, self.limits.floor_s / 2))
        return hb.get("alive_t") is not None and now - hb["alive_t"] <= quiet

    def cause(self, view: dict[int, dict], now: float) -> str:
        """One line: the limit, which rank(s) stopped progressing, at which step, for how long, where the stacks are."""
        def who(hb):
            return f"rank {hb['rank']} ({hb.get('host', '?')}, pid {hb.get('pid')})"

        def where(hb):
            ago = now - hb["progress_t"]
            if hb.get("step") is None:
                return f"no {self.what} ended in {ago:.0f} s"
            return f"{self.what} {hb['step']} ended {ago:.0f} s ago" + (f" (then {hb['phase']})" if hb.get("phase")
                                                                          else "")

        active = [hb for hb in view.values() if not hb.get("done")]
        silent = [hb for hb in active if not self.answering(hb, now)]
        late = [hb for hb in active if now - hb["progress_t"] > hb["limit_s"]]
        limit = max(hb["limit_s"] for hb in late) if late else self.limit()
        p95 = next((hb.get("p95_s") for hb in late if hb.get("p95_s")), None)
        figure = (f"max({self.limits.factor:g} x p95 {p95:.3g} s, {self.limits.floor_s:g} s) = {limit:.0f} s"
                  if p95 is not None and limit != self.limits.first_step_s else f"{limit:.0f} s")
        parts = [f"no {self.what} ended within {figure}"]
        if silent:
            parts += [f"{who(hb)} stopped reporting "
                      + (f"{now - hb['alive_t']:.0f} s ago" if hb.get("alive_t") else "(never reported)")
                      + f" (its process does not answer: stopped, or its node lost), its last {where(hb)}"
                      for hb in silent]
            rest = [hb for hb in active if hb not in silent]
            if rest:
                parts.append("waiting: " + ", ".join(f"{who(hb)}: {where(hb)}" for hb in rest))
        else:
            parts.append("stuck: " + ", ".join(f"{who(hb)}: {where(hb)}" for hb in late))
        parts.append(f"stacks in {self.hang_dir}")
        return "; ".join(parts)

    def _fire(self, view: dict[int, dict], now: float) -> None:
        self.hang_dir.mkdir(parents=True, exist_ok=True)
        cause = self.cause(view, now)
        try:  # the first rank to fire names the cause; the others use it
            fd = os.open(self.hang_dir / HANG_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump({"cause": cause, "by_rank": self.rank, "host": self.host, "time": now,
                           "heartbeats": view}, f, indent=1, default=str)
        except FileExistsError:
            cause = self._hang_cause() or cause
        self._dump_own(cause)
        for hb in view.values():
            if hb["rank"] != self.rank and not hb.get("done") and not self.answering(hb, now):
                self._write_silent(hb, now, cause)
        # the ranks that still answer write their own stacks within a poll or two; wait for them (bounded), because
        # this process ending ends the job step
        waiting = [hb["rank"] for hb in view.values() if hb["rank"] != self.rank and self.answering(hb, now)]
        deadline = time.time() + 3 * self.limits.poll_s + 5
        while waiting and time.time() < deadline:
            waiting = [r for r in waiting if not (self.hang_dir / f"rank{r}.txt").exists()]
            time.sleep(0.2)
        self._end(cause)

    def _join_hang(self) -> None:
        """Another rank fired: write this rank's stacks and end."""
        cause = self._hang_cause() or f"another rank's watchdog fired; stacks in {self.hang_dir}"
        self._dump_own(cause)
        self._end(cause)

    def _hang_cause(self) -> Optional[str]:
        try:
            return json.loads((self.hang_dir / HANG_FILE).read_text())["cause"]
        except (OSError, ValueError, KeyError):
            return None

    def _dump_own(self, cause: str) -> None:
        self._fired = True
        path = self.hang_dir / f"rank{self.rank}.txt"
        header = (f"rank {self.rank} of {self.world} on {self.host}, pid {os.getpid()}, job {self.job_id} "
                  f"(restart {self.restart}); last {self.what} ended: {self.step} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.progress_t))}; stacks taken "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\nhang: {cause}\n")
        try:
            self.hang_dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # another rank wrote this file because this one did not answer; it runs again now
                with path.open("a") as f:
                    f.write("\n" + format_stacks("=== this rank's own stacks, taken when it ran again:\n" + header))
            else:
                write_text_atomic(path, format_stacks(header))
        except OSError as e:
            log.warning("stacks not written to %s: %s", path, e)
            faulthandler.dump_traceback(all_threads=True)

    def _write_silent(self, hb: dict, now: float, cause: str) -> None:
        path = self.hang_dir / f"rank{hb['rank']}.txt"
        if path.exists():
            return
        alive = hb.get("alive_t")
        last = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alive)) + f" ({now - alive:.0f} s ago)") \
            if alive else "never"
        text = (f"rank {hb['rank']} of {self.world} on {hb.get('host', '?')}, pid {hb.get('pid')}, job {self.job_id}: "
                f"NO STACKS. Its process stopped reporting (stopped, or its node lost), so it could not write its own.\n"
                f"last heartbeat: {last}\nlast {self.what} ended: {hb.get('step')} at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(hb['progress_t']))} "
                f"({now - hb['progress_t']:.0f} s ago)\nnamed by rank {self.rank} on {self.host}\nhang: {cause}\n")
        try:
            path.write_text(text)
        except OSError as e:
            log.warning("%s not written: %s", path, e)

    def _end(self, cause: str) -> None:
        log.error("hang: %s", cause)
        sys.stderr.write("\n")  # a progress bar's unfinished line must not swallow the mark's start
        decided = False
        if self.on_end is not None:  # the engine's: mark, retry decision (rank 0), requeue (core.retry.in_task)
            faulthandler.dump_traceback_later(150, exit=True)  # the decision's scheduler calls get their own backstop
            self._armed = True
            try:
                self.on_end(cause)
                decided = True
            except Exception as e:  # deciding must never keep the process from ending
                log.error("hang: the retry decision failed: %s: %s", type(e).__name__, e)
        if not decided:
            failure_mark.report("hang", cause)
        sys.stdout.flush()
        os._exit(EXIT_CODE)


# ---------------------------------------------------------------- the task's watchdog
def idle() -> Watchdog:
    """A watchdog that watches nothing (a session built without `start`)."""
    return Watchdog(Path("."), "idle", 0, 1, "", Limits(enabled=False))


def set_collective_timeout(seconds: int) -> None:
    """The default process group's timeout (gloo, NCCL, HCCL) follows the watchdog's limit: `on_limit` of the engine."""
    import datetime

    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return
    try:
        tdist.set_timeout(datetime.timedelta(seconds=int(seconds)))
    except Exception as e:  # a backend that cannot change it keeps the timeout it was created with
        log.warning("collective timeout not changed to %d s: %s", seconds, e)
        return
    log.debug("collective timeout %d s", seconds)


_ACTIVE: dict[str, Any] = {"watchdog": None, "task": False}


@contextmanager
def in_task() -> Iterator[None]:
    """The span of a task's step function (core.runtime.TaskEntry): only there does `start` run a watchdog thread,
    so a workload function called in-process (tests, notebooks) never has a thread that could end its process."""
    _ACTIVE["task"] = True
    try:
        yield
    finally:
        _ACTIVE["task"] = False
        stop_active()


def start(spec, run_dir: Path, job_id: str, rank: int, world_size: int, host: str, restart: int = 0,
          what: str = "step", on_limit=None) -> Watchdog:
    """Start this rank's watchdog (stopping one that an earlier phase of the task left running); outside a task's
    step function (`in_task`) the watchdog is idle: it counts, but runs no thread."""
    stop_active()
    limits = Limits.of(spec)
    if not _ACTIVE["task"]:
        limits = Limits(limits.factor, limits.floor_s, limits.first_step_s, enabled=False)
    wd = Watchdog(run_dir, job_id, rank, world_size, host, limits, restart, what, on_limit).start()
    if wd.limits.enabled:
        _ACTIVE["watchdog"] = wd
        log.info("rank %d: hang watchdog on (a %s within max(%g x p95, %g s); the first within %g s)", rank, what,
                 wd.limits.factor, wd.limits.floor_s, wd.limits.first_step_s)
    return wd


def stop_active() -> None:
    """Stop the task's watchdog if one runs (the task entry calls it when the step function returns)."""
    wd = _ACTIVE["watchdog"]
    _ACTIVE["watchdog"] = None
    if wd is not None:
        wd.stop()
