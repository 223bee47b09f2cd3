"""Benchmark cases of branch-parallel guidance (``GuidedDenoiser(..., process_group=pg)``).

Run on a pool of N worker processes started once: NCCL, one GPU per process, on a machine with
N ≥ 2 GPUs; else gloo on the CPU (the step cases then use a tiny Wan). Two kinds of case:

* ``exchange``: the step's one collective at the size of a real prediction — Wan 2.1 14B at
  720p × 81 frames (latent 16×21×90×160; bf16 on GPUs, fp32 on CPU) — for CFG, CFG+PAG,
  CFG+PAG+SEG and CFG+PAG+SEG+SLG placed as the denoiser places them (the forked branches on
  cond's rank). Providers: ours (one ``all_to_all_single``, each rank receiving exactly the
  predictions it lacks); xDiT's scheme (one ``all_gather`` of every rank's predictions, padded to
  the busiest rank's branch count); sglang's (round-robin whole branches, one ``all_gather`` per
  slot of predictions up-cast to fp32). The case name carries the bytes each scheme moves per step
  (received, all ranks together) — :func:`bytes_per_step`.
* ``step``: one guided step of a Wan transformer on 1 process (one forked forward) against N
  processes — ours (forked placement) and whole branches (``fork=False``: every branch a full
  forward, as the all-gather schemes compute them).

On CPU every process computes with one thread (1 process: one core; N processes: N cores), which
keeps the comparison free of thread oversubscription on a shared machine; the tiny model makes
the step times mostly overheads. The multi-GPU plan is in ``benchmarks/parallel.md``.
"""

from __future__ import annotations

import atexit
import importlib.util
import math
import os
import tempfile

import torch

from .harness import Case, Provider, Setup

WAN_720P_LATENT = (1, 16, 21, 90, 160)  # Wan 2.1 at 1280×720, 81 frames: VAE strides 4 (time) × 8 × 8
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=128, num_layers=6, rope_max_seq_len=64)
STEP_COMBOS = {"CFG": ({}, {}),
               "CFG+PAG+SEG": (dict(pag_layers="blocks.3", seg_layers="blocks.2"), dict(pag_scale=3.0, seg_scale=3.0)),
               "CFG+PAG+SEG+SLG": (dict(pag_layers="blocks.3", seg_layers="blocks.2", slg_layers=(4,)),
                                   dict(pag_scale=3.0, seg_scale=3.0, slg_scale=2.8))}
EXCHANGE_BRANCHES = {
    "CFG": ("uncond", "cond"),
    "CFG+PAG": ("uncond", "cond", "pag"),
    "CFG+PAG+SEG": ("uncond", "cond", "seg", "pag"),
    "CFG+PAG+SEG+SLG": ("uncond", "cond", "seg", "pag", "slg"),
}
_FIRST = {"seg": 10, "pag": 20, "slg": 30}  # a 40-block DiT's perturbed blocks in the exchange cases


def exchange_placement(kinds, size: int):
    """The denoiser's placement of ``kinds`` for a 40-block DiT (block costs equal, outside the
    blocks 2 % of a forward; SLG skips block 30)."""
    from ..integrations.diffusers.parallel import Branch, place

    total, block = 1.0, 0.98 / 40
    branches = []
    for kind in kinds:
        if kind in ("uncond", "cond"):
            branches.append(Branch(kind, total))
            continue
        skipped = block if kind == "slg" else 0.0
        branches.append(Branch(kind, total - skipped, parent="cond",
                               forked_cost=total - _FIRST[kind] * block - skipped))
    return place(branches, size)


def _round_robin(kinds, size: int) -> list[list[str]]:
    groups = [[] for _ in range(size)]
    for i, kind in enumerate(kinds):
        groups[i % size].append(kind)
    return groups


def bytes_per_step(scheme: str, groups, branch_bytes: int, itemsize: int) -> int:
    """Bytes received per step by all ranks together. ``groups``: the branch names per rank.

    ``ours``: every rank receives the other ranks' predictions (plus a status element, padded to
    128 bytes, per rank); ``xdit``: an all-gather of max-k slots per rank; ``sglang``: the same in
    fp32, one all-gather per slot."""
    size = len(groups)
    if scheme == "ours":
        align = 128
        lengths = [-(-(len(g) * branch_bytes + itemsize) // align) * align for g in groups]
        return sum(sum(lengths) - lengths[r] for r in range(size))
    slots = max(len(g) for g in groups)
    if scheme == "xdit":
        return size * (size - 1) * slots * branch_bytes
    if scheme == "sglang":
        return size * (size - 1) * slots * branch_bytes * 4 // itemsize
    raise ValueError(f"bytes_per_step: scheme: unknown {scheme!r}")


# --------------------------------------------------------------------------- the worker pool


def _serve(rank: int, size: int, init: str, backend: str, threads: int, inbox, outbox) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=size)
    cache: dict = {}
    while True:
        task = inbox.get()
        if task is None:
            break
        try:
            run = cache.get(task)
            if run is None:
                run = cache[task] = _prepare(task, rank, size, device)
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            outbox.put(("ok", rank, ""))
        except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which reports it per provider
            outbox.put(("error", rank, f"{type(exc).__name__}: {exc}"))
    dist.destroy_process_group()


def _prepare(task, rank: int, size: int, device):
    """The callable a worker runs for ``task`` (built once per task)."""
    import torch.distributed as dist

    from ..integrations.diffusers.parallel import BranchParallel

    kind = task[0]
    if kind == "exchange":
        _, scheme, groups, shape, dtype_name = task
        dtype = getattr(torch, dtype_name)
        numel = math.prod(shape)
        # every scheme starts from the rank's predictions and allocates what it receives, per step
        parts = [torch.randn(numel, device=device).to(dtype) for _ in groups[rank]]
        if scheme == "ours":
            par = BranchParallel(dist.group.WORLD)
            lengths = [BranchParallel._length(len(g), numel, dtype) for g in groups]

            def ours():
                pieces = parts + [torch.zeros(lengths[rank] - len(parts) * numel, device=device, dtype=dtype)]
                return par._collect(torch.cat(pieces * size), lengths)

            return ours
        slots = max(len(g) for g in groups)
        pad = [torch.zeros(numel, device=device, dtype=dtype)] * (slots - len(parts))

        def xdit():  # one all-gather of the rank's slots, padded to the busiest rank's count
            send = torch.cat(parts + pad)
            dist.all_gather_into_tensor(send.new_empty(size * send.numel()), send)

        def sglang():  # one all-gather per slot, in fp32
            for part in parts + pad:
                part = part.float()
                dist.all_gather_into_tensor(part.new_empty(size * numel), part)

        return xdit if scheme == "xdit" else sglang
    _, options, scales, fork = task
    den, call = _step_denoiser(device, dict(options), dict(fork=fork), dist.group.WORLD)
    return lambda: call(den, dict(scales))


def _step_denoiser(device, options: dict, mode: dict, group):
    from diffusers import WanTransformer3DModel

    from ..integrations import diffusers as gkd

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**TINY_WAN).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(1, 4, 5, 16, 16, generator=g, device=device)
    cond, uncond = (torch.randn(1, 32, 32, generator=g, device=device) for _ in range(2))
    t = torch.full((1,), 500.0, device=device)
    den = gkd.GuidedDenoiser(model, **options, **mode, process_group=group)

    def call(den, scales):
        return den(sample, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                   guidance_scale=torch.tensor(5.0, device=device),
                   **{k: torch.tensor(v, device=device) for k, v in scales.items()})

    return den, call


class _Pool:
    """N worker processes in one process group; ``pool(task)`` runs ``task`` on every rank."""

    def __init__(self, size: int, backend: str):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.size, self.backend = size, backend
        self.init = tempfile.mktemp(prefix="gk-bench-")
        threads = 1 if backend == "gloo" else max(1, (os.cpu_count() or 2) // size)
        self.inbox = [ctx.Queue() for _ in range(size)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, size, self.init, backend, threads, self.inbox[r],
                                                       self.outbox), daemon=True) for r in range(size)]
        for p in self.procs:
            p.start()
        atexit.register(self.close)

    def __call__(self, task) -> None:
        for q in self.inbox:
            q.put(task)
        errors = []
        for _ in range(self.size):
            status, rank, text = self.outbox.get(timeout=600)
            if status != "ok":
                errors.append(f"rank {rank}: {text}")
        if errors:
            raise RuntimeError("; ".join(errors))

    def close(self) -> None:
        for q, p in zip(self.inbox, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if os.path.exists(self.init):
            os.remove(self.init)


# --------------------------------------------------------------------------- cases


def _exchange_cases(pool: _Pool, device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.bfloat16 if pool.backend == "nccl" else torch.float32
    shape = (1, 16, 3, 30, 40) if quick else WAN_720P_LATENT
    itemsize = torch.empty((), dtype=dtype).element_size()
    branch_bytes = math.prod(shape) * itemsize
    cases = []
    for label, kinds in EXCHANGE_BRANCHES.items():
        if quick and label == "CFG+PAG":
            continue
        ours = [list(g) for g in exchange_placement(kinds, pool.size).groups]
        robin = _round_robin(kinds, pool.size)
        mib = {s: bytes_per_step(s, ours if s == "ours" else robin, branch_bytes, itemsize) / 2**20
               for s in ("ours", "xdit", "sglang")}
        name = (f"{label} on {pool.size} ranks, placed {ours}: MiB/step ours {mib['ours']:.1f}, "
                f"xDiT all-gather {mib['xdit']:.1f}, sglang {mib['sglang']:.1f}")
        providers = [Provider(f"ours: all_to_all ({pool.backend})", lambda g=ours: pool(
                         ("exchange", "ours", tuple(map(tuple, g)), shape, str(dtype).split(".")[1])), ours=True),
                     Provider("xDiT: padded all_gather", lambda g=robin: pool(
                         ("exchange", "xdit", tuple(map(tuple, g)), shape, str(dtype).split(".")[1]))),
                     Provider("sglang: fp32 all_gather per slot", lambda g=robin: pool(
                         ("exchange", "sglang", tuple(map(tuple, g)), shape, str(dtype).split(".")[1])))]
        cases.append(Case(op="parallel", name=name, shape="x".join(map(str, shape)), dtype=str(dtype).split(".")[1],
                          providers=providers, bytes=int(mib["ours"] * 2**20),
                          baseline="xDiT: padded all_gather",
                          report=lambda rows, m=mib, extra=pool.size * (pool.size - 1) * 128 / 2**20: [
                              "bytes per step: ours moves no more than the all-gather schemes (+ a 128-byte "
                              f"status block per rank): {'yes' if m['ours'] <= min(m['xdit'], m['sglang']) + extra else 'NO'}"]))
    return cases


def _one_thread(fn):
    """``fn()`` computed with one thread, as each worker of the CPU pool computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _step_cases(pool: _Pool, quick: bool) -> list[Case]:
    device = torch.device("cuda", 0) if pool.backend == "nccl" else torch.device("cpu")
    cases = []
    for label, (options, scales) in STEP_COMBOS.items():
        if quick and label == "CFG+PAG+SEG":
            continue
        den, call = _step_denoiser(device, options, {}, None)
        task = tuple(sorted(options.items(), key=str)), tuple(sorted(scales.items()))
        providers = [Provider("1 process, one forked forward", lambda den=den, call=call, s=scales: _one_thread(
                         lambda: call(den, s))),
                     Provider(f"{pool.size} processes, ours (forked placement)",
                              lambda t=task: pool(("step", t[0], t[1], True)), ours=True),
                     Provider(f"{pool.size} processes, whole branches",
                              lambda t=task: pool(("step", t[0], t[1], False)), ours=True)]
        cases.append(Case(op="parallel", name=f"tiny Wan {label} step, 1 vs {pool.size} processes",
                          shape="1x4x5x16x16", dtype="float32", providers=providers,
                          baseline="1 process, one forked forward"))
    return cases


# The op stems these cases time (bench --ops filters on them).
OPS = ["parallel"]


def cases(setup: Setup) -> list[Case]:
    device, quick = setup.device, setup.quick or setup.smoke
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus >= 2:
        pool = _Pool(min(4, gpus), "nccl")
    else:
        pool = _Pool(2 if quick else max(2, min(4, (os.cpu_count() or 2) // 2)), "gloo")
    out = _exchange_cases(pool, device, quick)
    # the step cases use a tiny diffusers Wan: meaningful on CPU only, and only where diffusers is
    # installed (the GPU image has none; the exchange cases need nothing beyond torch)
    if pool.backend == "gloo" and importlib.util.find_spec("diffusers") is not None:
        out += _step_cases(pool, quick)
    return out
