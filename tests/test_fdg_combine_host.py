"""Host lane for fdg_combine's CUDA backend: ``tests/host/fdg_combine_host.cpp`` runs the kernels
of ``csrc/include/guidance_kernels/fdg_combine.cuh`` on the CPU (g++, and nvcc's host pass) over
the same launches and merge orders; the real glue (guidance_kernels/cuda/fdg_combine.py) plans the
call exactly as on a GPU and an emulated extension answers it. Results are compared with the
float64 truth (flash-attention rule)."""

from __future__ import annotations

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import _extension, _layout, backends
from guidance_kernels import reference as R
import host_lane
from host_lane import FMT, from_bits, storage, to_bits
from helpers import assert_close_to_truth, to64
from test_guidance_combine_host import FakeExtension, Host


def _scale_field(number, tensor, batch):
    if tensor is None:
        return f"n {float(number).hex()}"
    stride = 0 if tensor.numel() == 1 else tensor.stride(0)
    count = (batch - 1) * stride + 1 if stride else 1
    return f"t {count} {stride} " + " ".join(float(v).hex() for v in storage(tensor, count).tolist())


def _image_field(t: torch.Tensor) -> str:
    count = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    assert count <= t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return f"{count} {to_bits(storage(t, count))} strides " + " ".join(map(str, t.stride()))


class FdgFakeExtension(FakeExtension):
    """The combine family's emulated extension plus fdg_combine (csrc/fdg_combine_bindings.cpp)."""

    def __init__(self, combine_host: Host, fdg_exe):
        super().__init__(combine_host)
        self.fdg_exe = fdg_exe
        self.FDG_COMBINE_TILE = combine_host.tile
        self.fdg_calls = 0

    def fdg_combine(self, out, cond, uncond, sizes, tables, scales, scale_tensors, weights, phis, phi_tensors,
                    project, rescale, original, parts, chunks, data_phi, data_phi_tensor, final_parts, final_chunk):
        batch, channels, height, width = out.shape
        levels = len(scales)
        lines = [f"fdg fmt {FMT[out.dtype]} original {int(original)}", f"latent {batch} {channels} {height} {width}",
                 f"levels {levels} " + " ".join(map(str, sizes)), f"cond {_image_field(cond)}",
                 f"uncond {_image_field(uncond)}", "out " + " ".join(map(str, out.stride())) + f" {out.numel()}"]
        assert out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)
        for i in range(levels):
            line = (f"level scale {_scale_field(scales[i], scale_tensors[i], batch)} weight {float(weights[i]).hex()} "
                    f"project {project[i]} rescale {rescale[i]} {_scale_field(phis[i], phi_tensors[i], batch)} "
                    f"plan {parts[i]} {chunks[i]}")
            if i >= 1:
                y, x = tables[2 * (i - 1)], tables[2 * i - 1]
                line += f" tables {y.numel()} " + " ".join(v.hex() for v in y.tolist())
                line += f" {x.numel()} " + " ".join(v.hex() for v in x.tolist())
            lines.append(line)
        on = int(data_phi_tensor is not None or data_phi > 0)
        lines += [f"data {on} {_scale_field(data_phi, data_phi_tensor, batch)} {final_parts} {final_chunk}", "end"]
        (reply,) = host_lane.run(self.fdg_exe, "\n".join(lines))
        storage(out, out.numel()).copy_(from_bits(reply.split()[2:], out.dtype))
        self.fdg_calls += 1


@pytest.fixture(scope="session")
def hosts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("host")
    return Host(host_lane.build_gxx("guidance_combine_host", directory)), host_lane.build_gxx("fdg_combine_host",
                                                                                               directory)


@pytest.fixture
def cuda_on_cpu(hosts, monkeypatch) -> FdgFakeExtension:
    fake = FdgFakeExtension(*hosts)
    monkeypatch.setattr(_extension, "load", lambda: fake)
    monkeypatch.setattr(backends, "select", lambda op, tensor, facts=(), backend=None: "cuda")
    return fake


def _pair(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=g, dtype=torch.float64)
    return c.to(dtype), (c + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fdg_matches_truth(cuda_on_cpu, monkeypatch, dtype):
    cases = [((1, 4, 16, 16), [10.0, 5.0], {}),
             ((2, 3, 12, 20), [8.0, torch.tensor([1.0, 3.0]), 2.0], {"parallel_weights": [0.5, 1.0, 0.25]}),
             ((2, 2, 16, 16), [torch.tensor([4.0, 6.0]), 4.0], {"rescale": [0.5, torch.tensor([0.2, 0.9])],
                                                                "rescale_space": "freq"}),
             ((1, 2, 3, 8, 12), [6.0, 3.0], {"rescale": 0.7, "original_formulation": True, "parallel_weights": 0.5})]
    for target in (4, 64):  # one stats chunk per sample and several
        monkeypatch.setattr(_layout, "target_programs", lambda device, t=target: t)
        for shape, scales, kw in cases:
            c, u = _pair(shape, dtype, seed=len(shape) + target)
            truth = R.fdg_combine(to64(c), to64(u), to64(scales), **{k: to64(v) for k, v in kw.items()})
            lowp = R.fdg_combine(c, u, scales, **kw)
            out = gk.fdg_combine(torch.cat([u, c]), scales, **kw)
            assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{shape} {kw} target={target}")
    assert cuda_on_cpu.fdg_calls == 2 * len(cases)


def test_fdg_layouts(cuda_on_cpu):
    c, u = _pair((2, 4, 16, 24), torch.float32, seed=7)
    pred = torch.cat([u, c]).contiguous(memory_format=torch.channels_last)
    out = gk.fdg_combine(pred, [6.0, 3.0, 2.0], parallel_weights=0.5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    truth = R.fdg_combine(to64(c), to64(u), [6.0, 3.0, 2.0], parallel_weights=0.5)
    assert_close_to_truth(out, R.fdg_combine(c, u, [6.0, 3.0, 2.0], parallel_weights=0.5), truth, factor=4.0)


@pytest.mark.nvcc
def test_nvcc_host_build_agrees_with_gxx(hosts, tmp_path, monkeypatch):
    """The header compiled as CUDA (nvcc's host pass) computes the same bits as with g++."""
    other = host_lane.build_nvcc_host("fdg_combine_host", tmp_path)
    monkeypatch.setattr(backends, "select", lambda op, tensor, facts=(), backend=None: "cuda")
    c, u = _pair((1, 3, 12, 20), torch.bfloat16, seed=8)
    results = []
    for exe in (hosts[1], other):
        monkeypatch.setattr(_extension, "load", lambda e=exe: FdgFakeExtension(hosts[0], e))
        results.append(gk.fdg_combine([u, c], [7.0, torch.tensor(3.0), 2.0], parallel_weights=[0.5, 1.0, 0.2],
                                      rescale=[0.3, 0.0, 0.6], rescale_space="freq"))
    assert torch.equal(*results)
