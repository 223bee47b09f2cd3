"""Branch-parallel guidance (issue 16): placement, the single-process run with a parallel run's
calls, and real process groups — one job of 4 gloo processes started here (subgroups of 2 and 3
ranks and the world of 4), bounded by a hard timeout, whose records the tests below check:

* every rank's guided prediction equals, bit for bit, the single-process run with the same model
  calls (``BranchParallel(size=n)``) — UNet, SD3, Flux, Wan; CFG, CFG+PAG (forked), CFG+PAG+SEG,
  +SLG, SAG (+PAG); rescale, APG with momentum, CFG-Zero*; uneven placements and idle ranks —
  and the same on every rank;
* with ``per_branch=True``, bit for bit the plain single-process ``per_branch=True`` denoiser;
* batched, within 1e-5 of the plain single-process batched denoiser (the model's own kernels
  give a row a result that depends on the batch around it; documented in the module);
* a compiled model works, compiling once per rank; the exchange traces under ``fullgraph``;
* a rank whose share raises stops every rank with its error, nobody waits.

This file is also the worker: ``python tests/test_parallel.py --worker RANK WORLD INIT_FILE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from guidance_kernels.integrations import diffusers as gkd  # noqa: E402
from guidance_kernels.integrations.diffusers import parallel as P  # noqa: E402
import tiny_models as tm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = 4
TIMEOUT = 240  # seconds for the whole job (4 processes on 2 cores take ~60 s)

# --------------------------------------------------------------------------- the models and steps

SCALES = {
    "cfg": {},
    "pag": dict(pag_scale=2.0),
    "pag_seg": dict(pag_scale=2.0, seg_scale=1.5),
    "slg": dict(pag_scale=2.0, seg_scale=1.5, slg_scale=1.25),
    "sag": dict(sag_scale=0.75),
    "sag_pag": dict(sag_scale=0.75, pag_scale=2.0),
    "rescale": dict(pag_scale=2.0, guidance_rescale=0.7),
    "apg": dict(combine="apg", eta=0.5, norm_threshold=2.0, momentum=-0.5),
    "zero_star": dict(combine="cfg_zero_star"),
}
# (family, scales, group size, per_branch)
CASES = [
    ("unet", "cfg", 2, False), ("unet", "pag", 2, False), ("unet", "pag_seg", 3, False), ("unet", "pag_seg", 4, False),
    ("unet", "sag", 2, False), ("unet", "sag_pag", 3, False), ("unet", "sag_pag", 3, True),
    ("unet", "rescale", 2, False), ("unet", "apg", 2, False), ("unet", "zero_star", 3, False),
    ("sd3", "cfg", 2, False), ("sd3", "pag", 2, False), ("sd3", "pag_seg", 3, False), ("sd3", "slg", 4, False),
    ("flux", "cfg", 3, False), ("flux", "pag", 2, False), ("flux", "pag_seg", 3, False), ("flux", "slg", 2, True),
    ("wan", "cfg", 4, False), ("wan", "pag", 3, False), ("wan", "pag_seg", 2, False), ("wan", "slg", 3, False),
    ("wan", "pag_seg", 2, True),
]
CASE_IDS = [f"{f}-{s}-{n}ranks" + ("-per_branch" if pb else "") for f, s, n, pb in CASES]


def _family(name: str):
    """(model, call arguments but scales, GuidedDenoiser options) of one tiny model."""
    if name == "unet":
        from diffusers import DDIMScheduler

        sample, cond, uncond, _ = tm.unet_inputs(batch=2, hw=(16, 12))
        call = dict(sample=sample, timestep=torch.tensor(500), encoder_hidden_states=cond,
                    negative_encoder_hidden_states=uncond)
        return tm.unet_sd(), call, dict(pag_layers="mid", seg_layers="mid", sag=True, scheduler=DDIMScheduler())
    if name == "sd3":
        sample, cond, uncond, pooled, neg_pooled = tm.sd3_inputs(batch=1, hw=(16, 12))
        call = dict(sample=sample, timestep=torch.tensor([600.0]), encoder_hidden_states=cond,
                    negative_encoder_hidden_states=uncond, pooled_projections=pooled,
                    negative_pooled_projections=neg_pooled)
        return tm.sd3(), call, dict(pag_layers="blocks.1", seg_layers="blocks.2", slg_layers=[3], seg_sigma=0.8)
    sample, cond, uncond, kw, _ = tm.dit_inputs(name, batch=1)
    call = dict(sample=sample, timestep=torch.tensor([0.7] if name == "flux" else [700.0]), **cond,
                **{f"negative_{k}": v for k, v in uncond.items()}, model_kwargs=kw)
    layers = {"flux": dict(pag_layers="blocks.1", seg_layers="single_transformer_blocks.0",
                           slg_layers=["single_transformer_blocks.1"]),
              "wan": dict(pag_layers="blocks.1", seg_layers="blocks.0", slg_layers=[2])}[name]
    return getattr(tm, name)(), call, dict(seg_sigma=0.8, **layers)


def _step(den, call, scales, steps: int = 1) -> torch.Tensor:
    """``steps`` calls (APG: a fresh momentum buffer, then updated in place); the last result."""
    scales = dict(scales)
    if scales.get("combine") == "apg":
        scales["momentum_buffer"] = torch.zeros_like(call["sample"], dtype=torch.float32)
        steps = 2
    args = {k: v for k, v in call.items() if k not in ("sample", "timestep")}
    for _ in range(steps):
        out = den(call["sample"], call["timestep"], guidance_scale=4.0, **args, **scales)
    return out


def _denoise(model, call, options, scales, **extra) -> torch.Tensor:
    with gkd.GuidedDenoiser(model, **options, **extra) as den:
        return _step(den, call, scales)


# --------------------------------------------------------------------------- placement


def _plan(branches, size):
    placement = P.place(branches, size)
    return list(placement.groups), sorted(placement.forked)


def test_cfg_splits_one_branch_per_rank_and_extra_ranks_idle():
    cfg = [P.Branch("uncond", 1.0), P.Branch("cond", 1.0)]
    assert _plan(cfg, 1) == ([("uncond", "cond")], [])
    assert _plan(cfg, 2) == ([("uncond",), ("cond",)], [])
    placement = P.place(cfg, 4)
    assert placement.groups == (("uncond",), ("cond",), (), ()) and placement.loads == (1.0, 1.0, 0.0, 0.0)


def test_forked_branches_stay_with_cond_until_there_are_ranks_for_every_branch():
    pag = P.Branch("pag", 1.0, parent="cond", forked_cost=0.4)
    branches = [P.Branch("uncond", 1.0), P.Branch("cond", 1.0), pag]
    assert _plan(branches, 2) == ([("uncond",), ("cond", "pag")], ["pag"])  # makespan 1.4, not 2
    assert _plan(branches, 3) == ([("uncond",), ("cond",), ("pag",)], [])  # whole-branch placement: 1.0
    # a fork that costs as much as the branch is not worth co-locating when ranks are free
    late = [P.Branch("uncond", 1.0), P.Branch("cond", 1.0), P.Branch("pag", 1.0, parent="cond", forked_cost=0.95)]
    assert _plan(late, 3) == ([("uncond",), ("cond",), ("pag",)], [])


def test_flop_balance_moves_an_expensive_fork_to_the_other_rank_whole():
    seg = P.Branch("seg", 1.0, parent="cond", forked_cost=0.9)  # forks at the first block: saves little
    pag = P.Branch("pag", 1.0, parent="cond", forked_cost=0.3)
    branches = [P.Branch("uncond", 1.0), P.Branch("cond", 1.0), seg, pag]
    placement = P.place(branches, 2)
    assert placement.groups == (("uncond", "seg"), ("cond", "pag")) and placement.forked == {"pag"}
    assert placement.loads == (2.0, 1.3) and placement.makespan == 2.0  # vs 2.2 with both forked
    assert placement.rank_of("seg") == 0 and placement.rank_of("pag") == 1


def test_pinned_branches_follow_their_parent_and_ties_prefer_less_work():
    branches = [P.Branch("uncond", 1.0), P.Branch("cond", 1.0),
                P.Branch("pag", 1.0, parent="cond", forked_cost=0.5),
                P.Branch("sag", 1.0, parent="uncond", pinned=True)]
    # 3 ranks: makespan 2 (uncond + sag) either way; forking pag saves 0.5 of work
    assert _plan(branches, 3) == ([("uncond", "sag"), ("cond", "pag"), ()], ["pag"])
    assert _plan(branches, 2) == ([("uncond", "sag"), ("cond", "pag")], ["pag"])


def test_placement_bad_input_is_named():
    ok = P.Branch("cond", 1.0)
    with pytest.raises(ValueError, match=r"place: size: expected a positive int, got 0"):
        P.place([ok], 0)
    with pytest.raises(TypeError, match=r"place: branches: expected a non-empty sequence of Branch"):
        P.place([], 2)
    with pytest.raises(ValueError, match=r"place: branches: names must be unique"):
        P.place([ok, ok], 2)
    with pytest.raises(ValueError, match=r"place: branches: 'pag': parent 'cnd' is not another branch"):
        P.place([ok, P.Branch("pag", 1.0, parent="cnd")], 2)
    with pytest.raises(ValueError, match=r"place: branches: 'x': pinned / forked_cost need a parent"):
        P.place([ok, P.Branch("x", 1.0, pinned=True)], 2)
    with pytest.raises(ValueError, match=r"place: branches: 'x': cost must be a finite number >= 0, got nan"):
        P.place([ok, P.Branch("x", float("nan"))], 2)
    with pytest.raises(ValueError, match=r"place: branches: at most 10 branches"):
        P.place([P.Branch(str(i), 1.0) for i in range(11)], 2)


def test_denoiser_costs_come_from_the_meta_flop_count():
    model, call, options = _family("wan")
    with gkd.GuidedDenoiser(model, **options) as den:
        inputs = den._branch_inputs(1, True, call["encoder_hidden_states"], call["negative_encoder_hidden_states"],
                                    None, None, None, None, None, None)
        flops = P.count_flops(den, call["sample"], call["timestep"], inputs, call["model_kwargs"])
        branches = {b.name: b for b in P.denoiser_costs(den, ("uncond", "cond", "seg", "pag", "slg"), None, flops)}
    assert flops.shape == tuple(call["sample"].shape) and flops.dtype == torch.float32
    blocks = [flops.modules[f"blocks.{i}"] for i in range(3)]
    assert min(blocks) > 0 and sum(blocks) < flops.total
    assert branches["uncond"].cost == branches["cond"].cost == flops.total
    assert branches["seg"].forked_cost == flops.total  # SEG at block 0: forking saves nothing
    assert branches["pag"].forked_cost == flops.total - blocks[0]
    assert branches["slg"].cost == flops.total - blocks[2]  # SLG skips block 2 (forked: joins there)
    assert branches["slg"].forked_cost == flops.total - sum(blocks)


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("family", ["unet", "wan"])
def test_one_rank_is_the_plain_batched_step_and_per_branch_ranks_are_the_plain_per_branch_step(family):
    model, call, options = _family(family)
    scales = SCALES["sag_pag" if family == "unet" else "slg"]
    plain = _denoise(model, call, options, scales)
    assert torch.equal(_denoise(model, call, options, scales, process_group=P.BranchParallel(size=1)), plain)
    par = P.BranchParallel(size=2)
    torch.testing.assert_close(_denoise(model, call, options, scales, process_group=par), plain, rtol=1e-5, atol=1e-5)
    (placement,) = par.placements
    if family == "unet":  # SAG stays with uncond (its map and prediction), PAG forks on cond's rank
        assert placement.groups == (("uncond", "sag"), ("cond", "pag")) and placement.forked == {"pag"}
    else:  # SEG forks at block 0 (no saving): whole on uncond's rank; PAG and SLG fork
        assert placement.groups == (("uncond", "seg"), ("cond", "pag", "slg")), placement
    plain = _denoise(model, call, options, scales, per_branch=True)
    for size in (2, 3):
        got = _denoise(model, call, options, scales, per_branch=True, process_group=P.BranchParallel(size=size))
        assert torch.equal(got, plain), size


def test_per_branch_sag_uses_the_base_branch_key_mass():
    """One call per branch: SAG's map is the uncond call's (it was overwritten by later calls)."""
    model, call, options = _family("unet")
    batched = _denoise(model, call, options, SCALES["sag_pag"])
    per_branch = _denoise(model, call, options, SCALES["sag_pag"], per_branch=True)
    torch.testing.assert_close(per_branch, batched, rtol=1e-5, atol=1e-5)


def test_bad_process_group_arguments_are_named():
    model, call, options = _family("wan")
    with pytest.raises(TypeError, match=r"GuidedDenoiser: process_group: expected a torch.distributed ProcessGroup "
                                        r"or a BranchParallel, got str"):
        gkd.GuidedDenoiser(model, process_group="nccl")
    with pytest.raises(ValueError, match=r"BranchParallel: size: without a process group, give the number of ranks"):
        P.BranchParallel()
    with pytest.raises(TypeError, match=r"BranchParallel: process_group: expected a torch.distributed ProcessGroup"):
        P.BranchParallel(4)
    par = P.BranchParallel(size=2)
    placement = par.place([P.Branch("uncond", 1.0), P.Branch("cond", 1.0)])
    with pytest.raises(ValueError, match=r"BranchParallel.run: compute: 'uncond': expected \(1, 3\) torch.float32, "
                                         r"got \(2, 3\) torch.float32"):
        par.run(placement, lambda names: {n: torch.zeros(2, 3) for n in names}, shape=(1, 3), dtype=torch.float32,
                device="cpu")
    with pytest.raises(ValueError, match=r"BranchParallel.run: compute: must return \{name: prediction\} for "
                                         r"\['cond'\], got \['uncond'\]"):
        par.run(placement, lambda names: {"uncond": torch.zeros(1, 3)}, shape=(1, 3), dtype=torch.float32,
                device="cpu")
    with pytest.raises(ValueError, match=r"BranchParallel.run: placement: expected a Placement for 2 ranks"):
        par.run(P.place([P.Branch("cond", 1.0)], 3), dict, shape=(1, 3), dtype=torch.float32, device="cpu")


# --------------------------------------------------------------------------- benchmark cases


def test_bytes_per_step_counts_what_each_scheme_receives():
    from guidance_kernels.bench.cases_parallel import bytes_per_step, exchange_placement

    groups = [["uncond"], ["cond", "pag"]]  # bf16 branches of 1000 bytes
    # ours: contributions of 1002 and 2002 bytes padded to 1024 and 2048; each rank receives the other's
    assert bytes_per_step("ours", groups, 1000, 2) == 2048 + 1024
    assert bytes_per_step("xdit", groups, 1000, 2) == 2 * 1 * 2 * 1000  # both ranks gather 2 slots
    assert bytes_per_step("sglang", groups, 1000, 2) == 2 * 1 * 2 * 2000  # in fp32
    with pytest.raises(ValueError, match=r"bytes_per_step: scheme: unknown 'nccl'"):
        bytes_per_step("nccl", groups, 1000, 2)
    placement = exchange_placement(("uncond", "cond", "seg", "pag", "slg"), 2)
    assert placement.groups == (("uncond", "seg"), ("cond", "pag", "slg")) and placement.forked == {"pag", "slg"}


@pytest.mark.skipif(os.environ.get("GK_EXPECT_CUDA_TORCH") == "1",
                    reason="runs in the main lane: the 4-process job covers the collectives under this torch")
def test_parallel_bench_cases_run_on_a_cpu_pool():
    from guidance_kernels.bench import cases_parallel

    pool = cases_parallel._Pool(2, "gloo")
    try:
        cases = cases_parallel._exchange_cases(pool, torch.device("cpu"), quick=True) + \
            cases_parallel._step_cases(pool, quick=True)
        assert [c.name.split(" on ")[0].split(" step")[0] for c in cases] == [
            "CFG", "CFG+PAG+SEG", "CFG+PAG+SEG+SLG", "tiny Wan CFG", "tiny Wan CFG+PAG+SEG+SLG"]
        for case in cases:
            for provider in case.providers:
                provider.fn()
        assert all(case.report(None)[0].endswith(": yes") for case in cases[:3])  # bytes ≤ all-gather schemes
        with pytest.raises(RuntimeError, match=r"rank \d: AttributeError: .*rank \d: AttributeError") as info:
            pool(("exchange", "ours", (("a",), ("b",)), (4,), "no_such_dtype"))  # every worker reports
        assert "rank 0" in str(info.value) and "rank 1" in str(info.value)
    finally:
        pool.close()
    assert not any(p.is_alive() for p in pool.procs)


# --------------------------------------------------------------------------- the multi-process job


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _emit(**record) -> None:
    print("@@ " + json.dumps(record), flush=True)


def _worker(rank: int, world: int, init: str) -> None:
    import torch._dynamo.testing
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    groups = {2: dist.new_group([0, 1]), 3: dist.new_group([0, 1, 2]), 4: dist.group.WORLD}  # every rank creates all
    families = {name: _family(name) for name in ("unet", "sd3", "flux", "wan")}
    for (family, scales, size, per_branch), case in zip(CASES, CASE_IDS):
        if rank >= size:
            continue
        model, call, options = families[family]
        options = dict(options, per_branch=per_branch)
        got = _denoise(model, call, options, SCALES[scales], process_group=groups[size])
        single = _denoise(model, call, options, SCALES[scales], process_group=P.BranchParallel(size=size))
        plain = _denoise(model, call, options, SCALES[scales])
        _emit(case=case, rank=rank, equal=torch.equal(got, single), digest=_digest(got),
              plain_equal=torch.equal(got, plain),
              plain_rel=((got - plain).abs().max() / plain.abs().max()).item())

    # torch.compile: a compiled model under a process group compiles once per rank, steps change scales
    model, call, options = families["wan"]
    if rank < 2:
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        with gkd.GuidedDenoiser(model, **options, process_group=groups[2]) as den:
            den.model = torch.compile(model, fullgraph=True, backend=counter)
            outs = [_step(den, call, {k: torch.tensor(v + 0.25 * i) for k, v in SCALES["pag_seg"].items()})
                    for i in range(3)]
            den.model = model  # remove() finds the layers on the module itself
        with gkd.GuidedDenoiser(model, **options, process_group=P.BranchParallel(size=2)) as den:
            eager = [_step(den, call, {k: torch.tensor(v + 0.25 * i) for k, v in SCALES["pag_seg"].items()})
                     for i in range(3)]
        _emit(case="compile", rank=rank, frames=counter.frame_count,
              rel=max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs, eager)))
        par = P.BranchParallel(groups[2])
        send = torch.cat([torch.arange(5.0) + 10 * rank] * 2)  # the same 5 elements to both ranks
        compiled = torch.compile(par._collect, fullgraph=True, backend="aot_eager")(send, [5, 5])
        _emit(case="collect", rank=rank, equal=torch.equal(compiled, par._collect(send, [5, 5])),
              values=compiled.tolist())

    # a rank whose share raises (in its forward, not in the FLOP count on meta tensors that plans
    # the step): every rank stops with its error; then the group still works
    def boom(module, args):
        if not args[0].is_meta:
            raise RuntimeError(f"boom on rank {rank}")

    handle = model.blocks[1].register_forward_pre_hook(boom) if rank == 2 else None
    started = time.monotonic()
    try:
        _denoise(model, call, options, SCALES["pag_seg"], process_group=groups[4])
        error = None
    except Exception as exc:  # noqa: BLE001 - the record says what was raised
        error = f"{type(exc).__name__}: {exc}"
    if handle is not None:
        handle.remove()
    _emit(case="failure", rank=rank, error=error, seconds=time.monotonic() - started)
    after = _denoise(model, call, options, SCALES["cfg"], process_group=groups[4])
    _emit(case="after failure", rank=rank, digest=_digest(after))
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def job(tmp_path_factory):
    """The 4-process job's records: case -> {rank: record}."""
    out = tmp_path_factory.mktemp("parallel")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    logs = [(open(out / f"out{r}", "w"), open(out / f"err{r}", "w")) for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(WORLD), str(out / "init")],
                              stdout=o, stderr=e, env=env, cwd=ROOT) for r, (o, e) in enumerate(logs)]
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [r for r, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for o, e in logs:
            o.close()
            e.close()
    records: dict = {}
    for r in range(WORLD):
        for line in (out / f"out{r}").read_text().splitlines():
            if line.startswith("@@ "):
                record = json.loads(line[3:])
                records.setdefault(record["case"], {})[record["rank"]] = record
    tails = {r: (out / f"err{r}").read_text()[-3000:] for r in range(WORLD) if procs[r].returncode}
    assert not hung and not tails, f"ranks still running after {TIMEOUT} s: {hung}; failed ranks' stderr: {tails}"
    return records


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parallel_equals_the_single_process_run_on_every_rank(job, case):
    family, scales, size, per_branch = case
    records = job[CASE_IDS[CASES.index(case)]]
    assert sorted(records) == list(range(size))
    assert all(r["equal"] for r in records.values()), records
    assert len({r["digest"] for r in records.values()}) == 1, "ranks differ"
    if per_branch:  # the same model calls as the plain single-process per-branch denoiser
        assert all(r["plain_equal"] for r in records.values()), records
    else:  # the model's kernels depend on the batch size: documented, bounded
        assert all(r["plain_rel"] <= 1e-5 for r in records.values()), records


def test_compiled_model_under_a_process_group(job):
    for r in (0, 1):
        assert job["compile"][r]["frames"] == 1, job["compile"]
        assert job["compile"][r]["rel"] <= 1e-6, job["compile"]
        assert job["collect"][r]["equal"] and job["collect"][r]["values"] == [0.0, 1, 2, 3, 4, 10, 11, 12, 13, 14]


def test_a_failing_rank_stops_every_rank_with_its_error(job):
    records = job["failure"]
    assert sorted(records) == list(range(WORLD))
    assert records[2]["error"] == "RuntimeError: boom on rank 2"
    for r in (0, 1, 3):
        assert records[r]["error"].startswith("BranchParallelError: BranchParallel: rank 2 of the process group "
                                              "failed in its share of the step: RuntimeError: boom on rank 2"), records
    assert max(r["seconds"] for r in records.values()) < 30, records
    assert len({r["digest"] for r in job["after failure"].values()}) == 1  # the group still works


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
