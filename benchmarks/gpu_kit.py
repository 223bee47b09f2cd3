#!/usr/bin/env python3
"""The GPU run kit: everything a short GPU session should run, in phases that each have a time
budget, writing everything it keeps into ONE results folder. benchmarks/README.md ("A GPU run")
gives the exact commands and what to commit afterwards.

    python3 benchmarks/gpu_kit.py            # main command: about 7 minutes at most
    python3 benchmarks/gpu_kit.py diffusers  # second command: whole denoising steps (needs .whl/)

Main command phases (budget in seconds; the command stops within ``--budget``):

* ``preflight``  nvidia-smi, versions, clocks as reported (read only), which SDPA backend torch picks
  for bf16 d = 64 / 128 at N = 4096; stops here, with one line saying what is missing, when there
  is no GPU, no nvcc or (diffusers command) no wheel for a required package;
* ``build``      ``setup.py build_ext --inplace`` of ``_C`` for ``9.0a`` only, all cores;
* ``tests``      the GPU lane alone (``pytest -m gpu``, in parallel with pytest-xdist); the CPU-only
  and compile lanes run in CI, not here;
* ``bench``      ``python -m guidance_kernels bench --quick`` of every op family (not the whole-step
  ones), ``torch.compile(reference)`` only where a goal compares against it;
* ``sanitizer``  ``compute-sanitizer --tool memcheck`` over the bench smoke (every op × backend at
  tiny odd shapes) and then a few CUDA-backend and Triton tests, with torch's caching allocator off so
  an out-of-bounds access leaves its allocation.

The diffusers command: ``preflight``, ``wheels`` (``pip install --no-index --no-deps --target`` of
``.whl/*.whl``), ``bench`` of the diffusers family (SDXL UNet and SD3-size transformer steps).

Results (at most 7 files, flat; default folder ``$OUT`` when set): ``summary[-diffusers].txt``,
``logs[-diffusers].tar.gz`` (every phase's log, the JUnit XML, preflight facts) and
``bench-cuda[-diffusers].{json,md,png}``. The last lines of stdout summarise the phases, test
counts, memcheck errors and every goal as MET / NOT MET with its numbers.

``--dry-run`` rehearses all of it on a CPU (tests/test_gpu_kit.py does, in CI): the same phases,
timeouts, folder and summary, with CPU stand-ins for what needs a GPU (a pure-Python build, the
bench smoke on the CPU, no compute-sanitizer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN_BUDGETS = {"preflight": 35, "build": 90, "tests": 120, "bench": 110, "sanitizer": 40}
DIFFUSERS_BUDGETS = {"preflight": 35, "wheels": 30, "bench": 150}
MAX_RESULT_FILES = 7  # the machine returns at most 8 files; one spare
MAX_FILE_BYTES = 16 * 2**20
RESERVE_S = 8  # kept back from the last phase for the summary and the archive
# the op families of the main command; the whole-step ones (diffusers, dit: need the diffusers wheel;
# comfyui: needs ComfyUI, which is not on the image) are the second command's or not run there
OP_FAMILIES = "guidance_combine,gaussian_blur_2d,guided_attention,attention_key_mass,sag_degrade"
# the CUDA-backend and Triton tests memcheck runs after the bench smoke (it stops at the phase's budget)
SANITIZE_TESTS = ["tests/test_guidance_combine_cuda.py", "tests/test_sag_degrade.py", "tests/test_gaussian_blur_2d.py",
                  "-m", "gpu", "-k", "cuda-cuda or triton-cuda or test_guidance_combine_cuda"]
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class Stop(Exception):
    """Preflight found something missing: the message is the one line the kit prints."""


@dataclass
class Phase:
    name: str
    status: str = "not run"  # ok / FAILED (rc N) / TIMEOUT / SKIPPED (why)
    seconds: float = 0.0
    budget: float = 0.0
    facts: dict = field(default_factory=dict)


class Kit:
    def __init__(self, args):
        self.args = args
        self.command = args.command
        self.dry = args.dry_run
        self.out = Path(args.out).resolve()
        self.work = Path(tempfile.mkdtemp(prefix="gk-kit-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.suffix = "" if self.command == "main" else f"-{self.command}"
        self.device = "cpu" if self.dry else "cuda"
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.phases: list[Phase] = []
        self.facts: dict = {}
        self.site = self.work / "site"  # where the wheels are installed
        self.budgets = {**(MAIN_BUDGETS if self.command == "main" else DIFFUSERS_BUDGETS), **args.phase_budget}

    # ------------------------------------------------------------------ plumbing

    def say(self, text: str) -> None:
        print(f"[kit] {text}", flush=True)

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        paths = [str(self.site)] if self.site.exists() else []
        paths += [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if self.args.commit:
            env["GK_COMMIT"] = self.args.commit
        return env

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], log: str, *, timeout: float, env: dict | None = None) -> int | None:
        """Run ``cmd`` in its own process group, output to ``logs/<log>``; None when it timed out
        (SIGINT first, so pytest still writes its report; SIGKILL 15 s later)."""
        path = self.logs / log
        with path.open("a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                return proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
                fh.write(f"\n[kit] stopped at the phase's budget ({timeout:.0f} s)\n")
                return None

    def tail(self, log: str, lines: int = 25) -> str:
        try:
            return "\n".join((self.logs / log).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ phases

    def phase_order(self) -> list[str]:
        order = ["build", "tests", "bench", "sanitizer"] if self.command == "main" else ["wheels", "bench"]
        if self.args.phases:
            wanted = [p.strip() for p in self.args.phases.split(",") if p.strip()]
            unknown = sorted(set(wanted) - set(order) - {"preflight"})
            if unknown:
                raise Stop(f"--phases: unknown {', '.join(unknown)} (choose from preflight, {', '.join(order)})")
            order = [p for p in order if p in wanted]
        return order

    def execute(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        mode = "dry run on the CPU" if self.dry else "GPU run"
        self.say(f"{self.command} command, {mode}; results in {self.out}; budget {self.args.budget:.0f} s")
        try:
            order = self.phase_order()
            self.timed("preflight", self.preflight)
        except Stop as stop:
            self.say(f"STOP at preflight: {stop}")
            self.finish(stopped=str(stop))
            return 2
        for name in order:
            self.timed(name, getattr(self, f"phase_{name}"))
        return self.finish()

    def timed(self, name: str, body) -> None:
        phase = Phase(name, budget=self.budgets[name])
        self.phases.append(phase)
        timeout = min(phase.budget, self.remaining() - RESERVE_S)
        start = time.monotonic()
        if timeout < min(5.0, phase.budget):
            phase.status = "SKIPPED (no time left in the command's budget)"
        else:
            self.say(f"phase {name}: budget {timeout:.0f} s")
            try:
                phase.status = body(phase, timeout) or "ok"
            except Stop:
                phase.seconds = time.monotonic() - start
                phase.status = "STOP"
                raise
            except Exception as exc:  # the kit's own bug: say so in one line, keep going
                phase.status = f"FAILED (kit error: {type(exc).__name__}: {exc})"
        phase.seconds = time.monotonic() - start
        self.say(f"phase {name}: {phase.status} in {phase.seconds:.1f} s")

    def status_of(self, rc: int | None) -> str | None:
        return "TIMEOUT" if rc is None else (None if rc == 0 else f"FAILED (rc {rc})")

    # preflight ------------------------------------------------------------

    def preflight(self, phase: Phase, timeout: float) -> str | None:
        missing = []
        facts = self.facts
        facts["python"] = sys.version.split()[0]
        smi = shutil.which("nvidia-smi")
        facts["nvidia-smi -L"] = _output(["nvidia-smi", "-L"]) if smi else None
        if smi:
            facts["gpu"] = _output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pstate,clocks.sm,"
                                    "clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu",
                                    "--format=csv"])
            (self.logs / "nvidia-smi.txt").write_text(_output(["nvidia-smi"]) + "\n"
                                                     + _output(["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE"]))
        probe = self.probe(timeout)
        facts.update(probe)
        if "error" in probe:
            raise Stop(f"python3 cannot import torch / triton here: {probe['error']}")
        if not self.dry and not probe.get("cuda_available"):
            missing.append(f"no GPU (nvidia-smi {'-L: ' + str(facts['nvidia-smi -L']) if smi else 'not found'}; "
                           f"torch {probe.get('torch')} sees no CUDA device) — on a CPU rehearse with --dry-run")
        nvcc = probe.get("nvcc")
        if not nvcc and self.command == "main":
            missing.append(f"nvcc not found (torch's CUDA_HOME is {probe.get('cuda_home')}; PATH has none): "
                           "the build phase compiles _C with it")
        if not probe.get("pytest") and self.command == "main":
            missing.append("pytest is not installed (the tests phase runs it)")
        missing += self.missing_wheels()
        if missing:
            raise Stop("; ".join(missing))
        homes = [probe.get("cuda_home"), "/usr/local/cuda"]
        facts["compute-sanitizer"] = shutil.which("compute-sanitizer") or next(
            (str(p) for p in (Path(h) / "bin" / "compute-sanitizer" for h in homes if h) if p.exists()), None)
        self.say(f"GPU: {probe.get('gpu_name') or 'none (dry run)'}; torch {probe.get('torch')} (CUDA "
                 f"{probe.get('torch_cuda')}), triton {probe.get('triton')}, python {facts['python']}, nvcc {nvcc}")
        if facts.get("gpu"):
            self.say("nvidia-smi: " + " | ".join(facts["gpu"].splitlines()))
        for d, choice in probe.get("sdpa", {}).items():
            self.say(f"SDPA for bf16 d={d} N=4096: {choice}")
        for name in ("xdist", "matplotlib"):
            if not probe.get(name):
                self.say(f"note: {name} is not installed here" + (" (tests run serially)" if name == "xdist" else ""))
        (self.logs / "preflight.json").write_text(json.dumps(facts, indent=1, default=str) + "\n")
        return None

    def probe(self, timeout: float) -> dict:
        """Versions and the SDPA choice, from a subprocess (a broken torch must not take the kit down)."""
        try:
            proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                                  env=self.env(), timeout=max(5.0, timeout - 5))
        except subprocess.TimeoutExpired:
            return {"error": f"the version probe took more than {timeout - 5:.0f} s"}
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": last}
        return json.loads(lines[-1])

    def missing_wheels(self) -> list[str]:
        if self.command != "diffusers":
            return []
        folder = Path(self.args.wheels)
        wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
        have = {_dist_name(w) for w in wheels}
        missing = [n for n in self.args.require if _normalise(n) not in have]
        if not missing:
            self.wheels = wheels
            return []
        return [f"no wheel for {', '.join(missing)} in {folder}/ (found: {', '.join(w.name for w in wheels) or 'none'};"
                " download them as benchmarks/README.md says and carry the folder)"]

    # build ----------------------------------------------------------------

    def phase_build(self, phase: Phase, timeout: float) -> str | None:
        jobs = str(os.cpu_count() or 4)
        extra = {"TORCH_CUDA_ARCH_LIST": "9.0a", "MAX_JOBS": jobs}
        if self.dry:
            extra["GUIDANCE_KERNELS_SKIP_CUDA"] = "1"  # the same setup.py call, without nvcc
        if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
            extra["CUDA_HOME"] = "/usr/local/cuda"
        rc = self.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], "build.log",
                      timeout=timeout, env=self.env(**extra))
        status = self.status_of(rc)
        check = subprocess.run([sys.executable, "-c", "from guidance_kernels import _extension as e; "
                                "print(e.unavailable_reason() or 'built for ' + ', '.join(e.compiled_archs()))"],
                               capture_output=True, text=True, cwd=ROOT, env=self.env(), timeout=60)
        phase.facts["_C"] = (check.stdout.strip() or check.stderr.strip()[-300:])
        self.say(f"_C: {phase.facts['_C']} (MAX_JOBS={jobs})")
        if status:
            self.say("build log tail:\n" + self.tail("build.log"))
        elif not self.dry and not phase.facts["_C"].startswith("built"):
            status = "FAILED (_C does not load)"
        return status

    # tests ----------------------------------------------------------------

    def phase_tests(self, phase: Phase, timeout: float) -> str | None:
        xml = self.logs / "tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", self.args.tests_marker, "-q", "-rfE", "--tb=short",
               "-p", "no:cacheprovider", "--junitxml", str(xml)]
        if self.facts.get("xdist"):
            cmd += ["-n", str(min(16, os.cpu_count() or 1))]
        cmd += shlex.split(self.args.pytest_args)
        rc = self.run(cmd, "tests.log", timeout=timeout)
        phase.facts.update(_junit_counts(xml, self.logs / "tests.log"))
        self.say(f"tests: {_counts_line(phase.facts)}")
        if rc == 5:  # nothing collected: not a failure of the code
            return "ok (no test selected)"
        return self.status_of(rc)

    # bench ----------------------------------------------------------------

    def bench_cmd(self, ops: str, stem: str) -> list[str]:
        cmd = [sys.executable, "-m", "guidance_kernels", "bench", "--device", self.device, "--ops", ops,
               "--out", str(self.out), "--stem", stem]
        return cmd + (["--smoke"] if self.dry else ["--quick"])

    def phase_bench(self, phase: Phase, timeout: float) -> str | None:
        stem = f"bench-{self.device}{self.suffix}"
        ops = self.args.bench_ops or (OP_FAMILIES if self.command == "main" else "diffusers")
        rc = self.run(self.bench_cmd(ops, stem), f"bench{self.suffix}.log", timeout=timeout)
        phase.facts["json"] = str(self.out / f"{stem}.json")
        return self.status_of(rc)

    # sanitizer ------------------------------------------------------------

    def phase_sanitizer(self, phase: Phase, timeout: float) -> str | None:
        tool = self.facts.get("compute-sanitizer")
        if not self.dry and not tool:
            return "SKIPPED (compute-sanitizer not on PATH)"
        wrap = [] if self.dry else [tool, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "30",
                                    "--target-processes", "all"]
        env = self.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        start = time.monotonic()
        smoke = [sys.executable, "-m", "guidance_kernels", "bench", "--smoke", "--device", self.device, "--ops",
                 self.args.bench_ops or OP_FAMILIES, "--out", str(self.work / "sanitize"), "--stem", "sanitize"]
        rc = self.run(wrap + smoke, "sanitizer.log", timeout=timeout, env=env)
        statuses = [self.status_of(rc)]
        left = timeout - (time.monotonic() - start)
        if rc == 0 and not self.dry and left > 15:
            tests = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SANITIZE_TESTS]
            rc_tests = self.run(wrap + tests, "sanitizer.log", timeout=left, env=env)
            statuses.append(None if rc_tests is None else self.status_of(rc_tests))  # cut at the budget: fine
        phase.facts.update(_memcheck(self.logs / "sanitizer.log", self.dry))
        self.say(f"memcheck: {phase.facts['memcheck']}")
        return next((s for s in statuses if s), None)

    # wheels (diffusers command) --------------------------------------------

    def phase_wheels(self, phase: Phase, timeout: float) -> str | None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(self.site), *map(str, self.wheels)]
        status = self.status_of(self.run(cmd, "wheels.log", timeout=timeout))
        if status:
            self.say("pip log tail:\n" + self.tail("wheels.log"))
            return status
        for name in self.args.require:
            module = self.args.module.get(name, _normalise(name))
            check = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"],
                                   capture_output=True, text=True, cwd=ROOT, env=self.env(), timeout=120)
            where = check.stdout.strip() or (check.stderr.strip().splitlines() or ["?"])[-1]
            phase.facts[name] = where
            self.say(f"wheel {name}: import {module} -> {where}")
            if check.returncode != 0:
                return f"FAILED (import {module})"
        return None

    # summary --------------------------------------------------------------

    def finish(self, stopped: str | None = None) -> int:
        lines = self.summary(stopped)
        (self.logs / f"summary{self.suffix}.txt").write_text("\n".join(lines) + "\n")
        (self.out / f"summary{self.suffix}.txt").write_text("\n".join(lines) + "\n")
        archive = self.out / f"logs{self.suffix}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(self.logs.iterdir()):
                tar.add(path, arcname=f"logs{self.suffix}/{path.name}", filter=_cap_size)
        problems = check_results(self.out)
        print("\n".join(lines), flush=True)
        listing = ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in sorted(self.out.iterdir()))
        self.say(f"results folder {self.out}: {listing}")
        for problem in problems:
            self.say(f"results folder PROBLEM: {problem}")
        shutil.rmtree(self.work, ignore_errors=True)
        if stopped or problems:
            return 2 if stopped else 1
        bad = [p for p in self.phases if not (p.status.startswith("ok") or p.status.startswith("SKIPPED"))]
        return 1 if bad else 0

    def summary(self, stopped: str | None) -> list[str]:
        total = time.monotonic() - self.started
        lines = [f"[kit] ==== summary: {self.command} command, {'dry run' if self.dry else 'GPU run'} ===="]
        if stopped:
            lines.append(f"[kit] STOPPED at preflight: {stopped}")
        lines.append("[kit] phases: " + " | ".join(f"{p.name} {p.status} {p.seconds:.0f}s/{p.budget:.0f}s"
                                                    for p in self.phases) + f" | total {total:.0f} s")
        f = self.facts
        if f.get("torch"):
            lines.append(f"[kit] {f.get('gpu_name') or 'no GPU'}; torch {f.get('torch')}, triton {f.get('triton')}, "
                         f"python {f.get('python')}, commit {self.args.commit or f.get('commit') or 'unknown'}")
        for p in self.phases:
            if p.name == "build":
                lines.append(f"[kit] _C: {p.facts.get('_C')}")
            if p.name == "tests" and "passed" in p.facts:
                lines.append(f"[kit] tests (-m {self.args.tests_marker}): {_counts_line(p.facts)}")
                lines += [f"[kit]   failed: {name}" for name in p.facts.get("failed_ids", [])[:25]]
            if p.name == "sanitizer" and "memcheck" in p.facts:
                lines.append(f"[kit] memcheck: {p.facts['memcheck']}")
        lines += self.goal_lines()
        return lines

    def goal_lines(self) -> list[str]:
        path = self.out / f"bench-{self.device}{self.suffix}.json"
        if not any(p.name == "bench" for p in self.phases):
            return []
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            return [f"[kit] bench: no results ({path.name} missing)"]
        goals = payload.get("goals", [])
        marks = (("MET", True), ("NOT MET", False), ("n/a", None))
        count = {k: sum(1 for g in goals if g["met"] is v) for k, v in marks}
        errors = sum(1 for r in payload.get("results", []) if r.get("error"))
        lines = [f"[kit] bench: {len(payload.get('results', []))} timings ({errors} errors), goals: "
                 + ", ".join(f"{v} {k}" for k, v in count.items())]
        if payload.get("interrupted"):
            lines.append("[kit] bench INTERRUPTED at its budget: only the cases below were measured")
        lines += [f"[kit] skipped {k}: {v}" for k, v in payload.get("skipped", {}).items()]
        lines += [f"[kit] FAILED family {k}: {v}" for k, v in payload.get("failed", {}).items()]
        for r in payload.get("results", []):
            if r.get("error") and r.get("ours"):
                lines.append(f"[kit] error: {r['op']} | {r['case']} | {r['provider']}: {r['error'][:150]}")
        for g in goals:
            mark = {True: "MET", False: "NOT MET", None: "n/a"}[g["met"]]
            numbers = (f": {g['best']} {g['best_ms']:.4g} ms vs limit {g['limit_ms']:.4g} ms"
                       if g.get("best_ms") is not None and g.get("limit_ms") is not None else "")
            lines.append(f"{mark:<7} {g['op']} | {g['case']} | {g['goal']}{numbers}")
        for note in payload.get("notes", []):
            lines += [f"[kit] {note['op']} | {note['case']}:"] + [f"        {line}" for line in note["lines"]]
        return lines


# --------------------------------------------------------------------------- helpers

PROBE = r"""
import importlib.util, json, os, shutil
out = {}
try:
    import torch
except Exception as exc:
    raise SystemExit(f"torch: {type(exc).__name__}: {exc}")
out["torch"], out["torch_cuda"] = torch.__version__, torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
for name in ("triton", "xdist", "matplotlib", "pytest"):
    out[name] = importlib.util.find_spec(name) is not None
if out["triton"]:
    import triton
    out["triton"] = triton.__version__
try:
    from torch.utils.cpp_extension import CUDA_HOME
except Exception:
    CUDA_HOME = None
out["cuda_home"] = CUDA_HOME
nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
out["nvcc"] = nvcc if nvcc and os.path.exists(nvcc) else shutil.which("nvcc")
def sdpa_choice(d):
    # torch's own pick for bf16 (2, 10, 4096, d), and the kernels the profiler saw it launch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend
    names = {int(b.value): b.name for b in SDPBackend.__members__.values()}
    q = torch.randn(2, 10, 4096, d, device="cuda", dtype=torch.bfloat16)
    try:
        choice = names.get(int(torch._fused_sdp_choice(q, q, q)), "?")
    except Exception as exc:
        choice = f"? ({type(exc).__name__})"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, q, q)
        torch.cuda.synchronize()
    skip = ("aten::", "cuda", "Memcpy", "Memset", "ProfilerStep")
    kernels = sorted({e.key for e in prof.key_averages() if not e.key.startswith(skip)})
    return f"{choice}; kernels: {', '.join(k[:70] for k in kernels[:3]) or '?'}"
if out["cuda_available"]:
    out["gpu_name"] = torch.cuda.get_device_name()
    out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    out["sdpa"] = {}
    for d in (64, 128):
        try:
            out["sdpa"][d] = sdpa_choice(d)
        except Exception as exc:
            out["sdpa"][d] = f"probe failed: {type(exc).__name__}: {str(exc)[:200]}"
print(json.dumps(out))
"""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # it ended meanwhile
        pass


def _output(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (proc.stdout or proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_name(wheel: Path) -> str:
    return _normalise(wheel.name.split("-")[0])


def _junit_counts(xml: Path, log: Path) -> dict:
    """passed / failed / errors / skipped and the failed ids, from the JUnit XML (or the log's last line)."""
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        text = log.read_text(errors="replace") if log.exists() else ""
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|skipped)", text)}
        return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
                "errors": counts.get("error", 0), "skipped": counts.get("skipped", 0), "source": "log"}
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "seconds": sum(float(s.get("time", 0)) for s in suites), "failed_ids": failed, "source": "junit"}


def _counts_line(f: dict) -> str:
    return (f"{f.get('passed', 0)} passed, {f.get('failed', 0)} failed, {f.get('errors', 0)} errors, "
            f"{f.get('skipped', 0)} skipped" + (f" in {f['seconds']:.0f} s" if f.get("seconds") else ""))


def _memcheck(log: Path, dry: bool) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    if dry:
        return {"memcheck": "not run (dry run: the commands ran without compute-sanitizer)"}
    totals = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    kinds = sorted(set(re.findall(r"========= (Invalid [^\n]*?|Uninitialized [^\n]*?|Out-of-range [^\n]*?) (?:at|of)",
                                  text)))[:5]
    if not totals:
        return {"memcheck": "no ERROR SUMMARY in the log (the sanitizer did not finish: see sanitizer.log)"}
    found = f": {'; '.join(kinds)}" if kinds else ""
    return {"memcheck": f"{sum(totals)} errors in {len(totals)} process(es){found}",
            "memcheck_errors": sum(totals)}


def _cap_size(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if info.size > 8 * 2**20 else info  # one runaway log must not push the archive over the limit


def check_results(out: Path) -> list[str]:
    """What would not come back from the GPU machine: too many files, odd names, too deep, too big."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    if len(files) > MAX_RESULT_FILES:
        problems.append(f"{len(files)} files (at most {MAX_RESULT_FILES}): {', '.join(p.name for p in files)}")
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        if any(not NAME_RE.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name outside [A-Za-z0-9._-]")
        if p.is_file() and len(rel.parts) > 3:
            problems.append(f"{rel}: more than 2 folders deep")
        if p.is_symlink():
            problems.append(f"{rel}: a link")
        elif p.is_file() and p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size / 2**20:.1f} MiB (at most 16)")
    return problems


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_kit.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["main", "diffusers"], default="main")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-kit-out",
                        help="the results folder (default: $OUT when set, else ./gpu-kit-out)")
    parser.add_argument("--budget", type=float, help="seconds the whole command may take (default: 395 main, 215 "
                                                     "diffusers; a phase stopped at its end gets 15 s more)")
    parser.add_argument("--phases", help="comma-separated phases to run after preflight (default: all), for a rerun")
    parser.add_argument("--phase-budget", action="append", default=[], metavar="PHASE=SECONDS",
                        help="override one phase's budget")
    parser.add_argument("--tests-marker", default="gpu", help="marker expression of the tests phase (default: gpu, "
                                                                   "the GPU lane)")
    parser.add_argument("--pytest-args", default="tests", help="what the tests phase runs (default: tests; a rerun "
                                                               "can name files, -k expressions...)")
    parser.add_argument("--bench-ops", help="families / ops of the bench (and sanitizer) phase (default: the op "
                                             "families for the main command, diffusers for the diffusers one; "
                                             "diffusers,dit adds the DiT steps: ~3 more minutes)")
    parser.add_argument("--commit", default=os.environ.get("GK_COMMIT"),
                        help="the commit being run (the copied tree has no .git); default $GK_COMMIT")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="wheel folder of the diffusers command")
    parser.add_argument("--require", action="append", help="distributions the diffusers command needs as wheels "
                                                           "(default: diffusers)")
    parser.add_argument("--module", action="append", default=[], metavar="DIST=MODULE",
                        help="module to import for a required distribution (default: its normalised name)")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on a CPU (no GPU, no sanitizer)")
    args = parser.parse_args(argv)
    budgets = MAIN_BUDGETS if args.command == "main" else DIFFUSERS_BUDGETS
    parsed = {}
    for item in args.phase_budget:
        name, _, value = item.partition("=")
        if name not in budgets or not re.fullmatch(r"\d+(\.\d*)?", value):
            parser.error(f"--phase-budget: {item!r} is not PHASE=SECONDS with PHASE one of {', '.join(budgets)}")
        parsed[name] = float(value)
    args.phase_budget = parsed
    args.require = args.require or ["diffusers"]
    args.module = dict(item.partition("=")[::2] for item in args.module)
    args.budget = args.budget or (395.0 if args.command == "main" else 215.0)
    return args


def main(argv: list[str] | None = None) -> int:
    return Kit(parse_args(argv)).execute()


if __name__ == "__main__":
    sys.exit(main())
