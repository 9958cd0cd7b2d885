"""Where a served request's CPU goes: CPU seconds by process, and inside each, by activity.

On a machine whose cores are all busy, throughput is CPU per request. During a
load run :class:`CpuProfile` reads every process's CPU time before and after
(psutil) and samples the serving processes with py-spy (``--nonblocking``, so
they are not paused), then divides both by the requests answered:

- by process role: the HTTP proxy, the router (the ingress), each model stage's
  replicas, Redis, Ray's own processes, the load generator;
- inside each Python serving process, by what it was doing: decoding images,
  preprocessing, the models, Redis calls, serialization between processes,
  HTTP, schemas, Ray's request routing, the event loop.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Ray names its actor processes "ray::<class>"; Serve's replicas "ServeReplica:<app>:<deployment>".
_ROLES = (
    (re.compile(r"ray::ServeReplica:[^:]+:(\w+)"), "serve replica: {0}"),
    (re.compile(r"ray::ProxyActor"), "HTTP proxy"),
    (re.compile(r"(?:^|/)haproxy\b"), "HAProxy"),  # the ingress (C): its CPU, not sampled
    (re.compile(r"ray::ServeController"), "Serve controller"),
    (re.compile(r"redis-server"), "Redis"),
    (re.compile(r"locust"), "load generator (Locust)"),
    (re.compile(r"raylet|gcs_server|dashboard|ray::|ray/_private|log_monitor|monitor\.py"), "Ray"),
)
# What a sampled stack was doing, first match wins: (activity, any of these in the stack).
# py-spy names each frame "function (path/relative/to/its/sys.path/entry.py:line)".
ACTIVITIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("image decode and checks", ("decode_image (", "decode_base64 (")),
    ("preprocessing", ("batched_inputs (", "as_model_input (")),
    ("heatmap PNG", ("encode_heatmap (",)),
    (
        "model",
        ("(torch/", "(onnxruntime/", "(timm/", "(transformers/", "(open_clip/", "(models/runtime"),
    ),
    ("Redis client", ("(redis/",)),
    ("serialization", ("serialization.py", "pickle", "(msgpack/")),
    (
        "HTTP and ASGI",
        ("(uvicorn/", "(starlette/", "(fastapi/", "(h11/", "(httptools/", "multipart"),
    ),
    ("schemas (pydantic)", ("(pydantic",)),
    ("inspection flow", ("(models/inspection/", "(deployments/")),
    ("Ray request routing", ("(ray/",)),
    ("event loop", ("(asyncio/", "uvloop")),
)
# A stack that ends in one of these is a thread waiting, not working: with
# --nonblocking py-spy cannot tell idle threads apart, so they are left out.
WAITING = (
    "(threading.py:",
    "(concurrent/futures/thread.py:",
    "(queue.py:",
    "(selectors.py:",
    "run_forever (",  # an event loop (uvloop's is C) waiting for its next event
    "_run_user_code_event_loop (",
    "_run_router_event_loop (",
    "Worker.main_loop (",
    "PythonGCThread.run (",
)


def role_of(process: psutil.Process) -> str | None:
    """The role of a process in the served system, or None for the rest of the machine."""
    try:
        command = " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    for pattern, role in _ROLES:
        found = pattern.search(command)
        if found:
            return role.format(*found.groups())
    return None


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process with a role: its pid → (role, user + system CPU seconds)."""
    found = {}
    for process in psutil.process_iter():
        role = role_of(process)
        if role is None:
            continue
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found[process.pid] = (role, times.user + times.system)
    return found


def activity_of(stack: str) -> str:
    """What a py-spy stack (frames joined by ``;``) was doing."""
    for activity, markers in ACTIVITIES:
        if any(marker in stack for marker in markers):
            return activity
    return "other"


def waiting(stack: str) -> bool:
    """Whether a sampled stack is a thread waiting (its innermost frame a wait)."""
    innermost = stack.rsplit(";", 1)[-1]
    return not innermost.strip() or any(marker in innermost for marker in WAITING)


def read_samples(lines: Iterable[str]) -> Counter[str]:
    """Samples by activity from py-spy's ``--format raw`` output (``stack count`` lines).

    Threads waiting are left out: the CPU time measured is split among the rest.
    """
    samples: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if count.isdigit() and not waiting(stack):
            samples[activity_of(stack)] += int(count)
    return samples


@dataclass
class CpuProfile:
    """CPU by process role and activity over one load run (``with CpuProfile(...)``).

    Args:
        out: folder for py-spy's raw stacks.
        seconds: how long py-spy samples (the run's measured window).
        rate: py-spy samples per second.
    """

    out: Path
    seconds: float
    rate: int = 50
    before: dict[int, tuple[str, float]] = field(default_factory=dict)
    after: dict[int, tuple[str, float]] = field(default_factory=dict)
    spies: dict[int, tuple[str, subprocess.Popen, Path]] = field(default_factory=dict)
    wall_s: float = 0.0

    def start(self) -> None:
        """Read CPU times and start sampling the serving processes."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.before = cpu_seconds()
        self.wall_s = time.monotonic()
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        for pid, (role, _) in self.before.items():
            if not (role.startswith("serve replica") or role == "HTTP proxy"):
                continue
            raw = self.out / f"{pid}.txt"
            command = [
                spy, "record", "--pid", str(pid), "--duration", str(round(self.seconds)),
                "--rate", str(self.rate), "--nonblocking", "--format", "raw", "-o", str(raw),
            ]  # fmt: skip
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.spies[pid] = (role, process, raw)
        # Which process each raw file sampled, to read the samples again later.
        roles = {str(pid): role for pid, (role, _, _) in self.spies.items()}
        (self.out / "roles.json").write_text(json.dumps(roles, indent=1))

    def stop(self) -> None:
        """Read CPU times again and wait for the samplers."""
        self.after = cpu_seconds()
        self.wall_s = time.monotonic() - self.wall_s
        for _, process, _ in self.spies.values():
            try:
                process.wait(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                process.kill()

    def report(self, requests: int) -> dict[str, dict[str, object]]:
        """Per role: processes, CPU milliseconds per request, and that split by activity."""
        cpu: Counter[str] = Counter()
        processes: Counter[str] = Counter()
        for pid, (role, seconds) in self.after.items():
            start = self.before.get(pid, (role, 0.0))[1]
            cpu[role] += max(0.0, seconds - start)
            processes[role] += 1
        samples: dict[str, Counter[str]] = {}
        for role, _, raw in self.spies.values():
            if raw.is_file():
                samples.setdefault(role, Counter()).update(
                    read_samples(raw.read_text().splitlines())
                )
        per_request = max(requests, 1)
        rows: dict[str, dict[str, object]] = {}
        for role, seconds in cpu.most_common():
            ms = 1000.0 * seconds / per_request
            row: dict[str, object] = {
                "processes": processes[role],
                "cpu_ms_per_request": round(ms, 2),
            }
            counts = samples.get(role)
            if counts:
                total = sum(counts.values())
                row["by_activity_ms"] = {
                    activity: round(ms * n / total, 2) for activity, n in counts.most_common()
                }
            rows[role] = row
        return rows
