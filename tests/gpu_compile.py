"""Offline GPU compile check: every Triton kernel launch of the launchers, compiled for sm_80 / sm_90, no GPU.

Triton's CPU interpreter forgives what a real compile rejects (types, layouts, shared-memory or register
blowups). This module runs the launchers of ``sra_kernels.ops.spatial_reduce`` and ``sra_kernels.ops.attention``
on meta tensors laid out as PVT's are, with every ``*_kernel[grid](...)`` replaced by a stub that records the
call (no kernel runs). Each recorded call is specialised by Triton's own runtime binder for the target
(pointer dtypes, ints equal to 1 as constexprs, divisibility-by-16 attributes, i64 for big ints), launches
are de-duplicated by the runtime's cache key (kernel, specialisation, options), and each distinct launch is
compiled with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` and the ptxas bundled in the
triton wheel. Reported per launch: shared memory (Triton's metadata), registers and stack bytes per thread
(``cuobjdump -res-usage``; Triton kernels use the stack only for register spills).

    python -m tests.gpu_compile [--arch 80 90] [--json]

Run it without TRITON_INTERPRET=1 (under the interpreter @triton.jit gives interpreted functions).
Exit status: 0 all compiled, 1 a compile failed, 2 no toolchain here (no nvidia backend or bundled ptxas).

Assumptions: meta tensors have data_ptr() == 0, so every pointer is specialised as 16-byte aligned, as PVT's
tensors are (fresh allocations; head and k/v column slices start at multiples of 16 bytes). The attention
plan sizes its grid by the SM count, stubbed per arch (A100 108, H100 132 SMs); it changes only how many
dK/dV partials there are (an int argument, a constexpr when it is 1).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import torch

SM_COUNT = {80: 108, 90: 132}
"""SMs of the reference part of each arch (A100, H100 SXM), what the attention plan sees on that GPU."""

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

SPATIAL_CASES = (
    # (B, H, W, C, sr): PVT stage grids at 224 px (C 64..320) and a 512 px segmentation stage 4 (C 512).
    *((2, hw, hw, c, sr) for hw, c in ((56, 64), (28, 128), (14, 320), (16, 512)) for sr in (2, 4, 8)),
    (2, 33, 50, 128, 4),  # H, W not multiples of sr (trailing rows/columns) and odd token counts
)
LINEAR_CASES = ((2, 56, 56, 64), (2, 28, 28, 128), (2, 14, 14, 320), (2, 7, 7, 512))
"""(B, H, W, C) of PVTv2-li's linear-mode stages at 224 px (pool to 7x7)."""

ATTENTION_CASES = tuple(
    # (B, N, M, heads, d): M keys of an sr-reduced grid of N queries; heads * d = PVT / SegFormer channels.
    (2, n, m, h, d)
    for n, m in ((3136, 49), (16384, 256), (4096, 1024))
    for h, d in ((2, 32), (2, 64), (8, 40), (4, 128))
)


class Launch(NamedTuple):
    """One distinct kernel launch, ready for triton.compile (picklable)."""

    module: str  # module holding the kernel
    kernel: str  # kernel name
    arch: int
    case: str  # first launcher call that made it, e.g. "spatial_reduce bf16 B2 56x56 C64 sr8"
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # num_warps, num_stages


# --------------------------------------------------------------------------------------------------
# Capture: run the launchers with recording stubs in place of the kernels
# --------------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a JITFunction: ``stub[grid](*args, **kwargs)`` records (kernel, args, kwargs)."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _allow_meta(check):
    """The attention launcher's argument check minus its device check (meta tensors stand in for CUDA)."""

    def checked(q):
        try:
            check(q)
        except RuntimeError:
            if q.device.type != "meta":
                raise

    return checked


@contextlib.contextmanager
def _recording(sm_count: int):
    """Swap every ``*_kernel`` of the op modules for a recorder; yields the list the launches go to."""
    from triton.runtime.jit import JITFunction

    from sra_kernels.ops import attention, spatial_reduce

    launches: list = []
    patches = {(attention, "_num_sms"): lambda device: sm_count,
               (attention, "_check_launchable"): _allow_meta(attention._check_launchable)}
    for module in (spatial_reduce, attention):
        for name, fn in vars(module).items():
            if name.endswith("_kernel") and isinstance(fn, JITFunction):
                patches[(module, name)] = _Recorder(fn, launches)
    saved = {key: getattr(*key) for key in patches}
    for (module, name), stub in patches.items():
        setattr(module, name, stub)
    try:
        yield launches
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)


def _spatial_reduce_calls(dtype: torch.dtype):
    """(label, thunk) of spatial_reduce_forward + backward calls on meta tensors, strided and linear mode."""
    from sra_kernels.ops.spatial_reduce import spatial_reduce_backward, spatial_reduce_forward

    def call(B, H, W, C, sr, linear):
        meta = dict(device="meta", dtype=dtype)
        k = 1 if linear else sr
        x = torch.empty(B, H * W, C, **meta)
        weight, vec = torch.empty(C, C, k, k, **meta), torch.empty(C, **meta)
        y, *saved = spatial_reduce_forward(x, H, W, weight, vec, vec, vec, sr, linear, 1e-5)
        spatial_reduce_backward(torch.empty_like(y), x, H, W, weight, vec, vec, vec, *saved, sr, linear, 1e-5)

    for B, H, W, C, sr in SPATIAL_CASES:
        yield f"B{B} {H}x{W} C{C} sr{sr}", lambda a=(B, H, W, C, sr, False): call(*a)
    for B, H, W, C in LINEAR_CASES:
        yield f"B{B} {H}x{W} C{C} linear", lambda a=(B, H, W, C, 1, True): call(*a)


def _attention_calls(dtype: torch.dtype):
    """(label, thunk) of attention_forward + backward (deterministic and atomic) calls on meta tensors.

    q is a (B, N, h*d) projection viewed per head; k and v are the halves of a (B, M, 2, h, d) projection.
    """
    from sra_kernels.ops.attention import attention_backward, attention_forward

    def call(B, N, M, h, d, deterministic):
        meta = dict(device="meta", dtype=dtype)
        q = torch.empty(B, N, h * d, **meta).view(B, N, h, d)
        kv = torch.empty(B, M, 2, h, d, **meta)
        o, lse = attention_forward(q, kv[:, :, 0], kv[:, :, 1], d ** -0.5)
        attention_backward(torch.empty_like(o), q, kv[:, :, 0], kv[:, :, 1], o, lse, d ** -0.5, deterministic)

    for B, N, M, h, d in ATTENTION_CASES:
        for det in (True, False):
            label = f"B{B} N{N} M{M} h{h} d{d} {'det' if det else 'atomic'}"
            yield label, lambda a=(B, N, M, h, d, det): call(*a)


def capture(archs) -> list[Launch]:
    """Every distinct launch of the representative calls, specialised as the runtime would for each arch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    distinct: dict = {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders: dict = {}
        for op, calls in (("spatial_reduce", _spatial_reduce_calls), ("attention", _attention_calls)):
            for dtype in DTYPES:
                for label, thunk in calls(dtype):
                    with _recording(SM_COUNT[arch]) as launches:
                        thunk()
                    for fn, args, kwargs in launches:
                        if fn not in binders:
                            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
                        bound, spec, options = binders[fn](*args, **kwargs)
                        key = (arch, fn.__module__, fn.__name__, str(spec), str(options))
                        if key not in distinct:
                            case = f"{op} {str(dtype)[6:]} {label}"
                            distinct[key] = _launch(fn, arch, case, bound, spec, options, backend)
    return list(distinct.values())


def _launch(fn, arch, case, bound, spec, options, backend) -> Launch:
    """The triton.compile inputs of one launch from the binder's (bound args, specialisation, options)."""
    names = list(bound)
    kinds = [s[0] for s in spec]
    constexprs = {(i,): bound[n] for i, n in enumerate(names) if kinds[i] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str) and s[1]}
    return Launch(fn.__module__, fn.__name__, arch, case, dict(zip(names, kinds)), constexprs, attrs, dict(options))


# --------------------------------------------------------------------------------------------------
# Compile
# --------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path of a CUDA binary bundled in the triton wheel."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def toolchain_problem() -> str | None:
    """Why these kernels cannot be compiled for NVIDIA targets here, or None."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 32))
    except Exception as error:  # noqa: BLE001 -- any failure means: no usable nvidia backend
        return f"triton's nvidia backend is unavailable: {error!r}"
    for name in ("ptxas", "cuobjdump"):
        if not os.access(_tool(name), os.X_OK):
            return f"the triton wheel has no bundled {name} ({_tool(name)})"
    return None


def compile_launch(launch: Launch) -> dict:
    """Compile one launch; its report row (shared bytes, registers and stack bytes per thread, or the error)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(launch.signature)
    row = dict(kernel=launch.kernel, arch=launch.arch, case=launch.case, **launch.options,
               constexprs={names[i]: value for (i,), value in launch.constexprs.items() if names[i].isupper()})
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    try:
        src = ASTSource(fn=fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", launch.arch, 32), options=launch.options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(kernel.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin.name],
                                   capture_output=True, text=True, check=True).stdout
    except Exception as error:  # noqa: BLE001 -- reported per launch, the run exits non-zero
        lines = str(error).strip().splitlines() or [repr(error)]
        return dict(row, ok=False, error=f"{type(error).__name__}: " + "\n".join(lines[-20:]))
    return dict(row, ok=True, shared=kernel.metadata.shared,
                registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                spill=int(re.search(r"STACK:(\d+)", usage).group(1)))


def compile_all(launches: list[Launch], workers: int) -> list[dict]:
    """Report rows of every launch, compiled on `workers` forked processes."""
    if workers <= 1:
        return [compile_launch(launch) for launch in launches]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(compile_launch, launches))


def format_table(rows: list[dict]) -> str:
    """One line per launch: arch, kernel, warps/stages, smem, registers, spill, the case that made it."""
    lines = [f"{'arch':<5} {'kernel':<30} {'w':>2} {'s':>2} {'smem':>7} {'regs':>4} {'spill':>5}  case / blocks"]
    for r in rows:
        head = f"sm_{r['arch']:<2} {r['kernel']:<30} {r['num_warps']:>2} {r['num_stages']:>2}"
        blocks = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK"))
        if r["ok"]:
            lines.append(f"{head} {r['shared']:>7} {r['registers']:>4} {r['spill']:>5}  {r['case']} | {blocks}")
        else:
            lines.append(f"{head} FAILED  {r['case']} | {blocks}\n    " + r["error"].replace("\n", "\n    "))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SM_COUNT))
    parser.add_argument("--json", action="store_true", help="print the report rows as a JSON list")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run without TRITON_INTERPRET=1: under the interpreter @triton.jit gives interpreted functions",
              file=sys.stderr)
        return 2
    problem = toolchain_problem()
    if problem:
        print(f"SKIP: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    launches = capture(args.arch)
    rows = compile_all(launches, args.workers)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows)} distinct launches, {failed} failed, {time.perf_counter() - start:.0f} s "
          f"({args.workers} workers)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
