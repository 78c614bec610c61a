"""Offline GPU compile check: the Triton kernel launches of the launchers, compiled for sm_80 / sm_90, no GPU.

Triton's CPU interpreter forgives what a real compile rejects (types, layouts, shared-memory or register
blowups). This module runs the launchers of ``sra_kernels.ops.spatial_reduce``, ``.attention`` and ``.projected_attention``
on meta tensors laid out as PVT's are, with every ``*_kernel[grid](...)`` replaced by a stub that records the
call (no kernel runs). Triton's own runtime binder specialises each recorded call for the target (pointer
dtypes, ints equal to 1 as constexprs, divisibility-by-16 attributes, i64 for big ints); launches are
de-duplicated by the runtime's cache key (kernel, specialisation, options) and each distinct one is compiled
by ``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` with the ptxas bundled in the triton wheel.
Reported per launch: shared memory (Triton's metadata), registers and spill bytes per thread: the stack
frame of ``cuobjdump -res-usage``, which in Triton kernels holds only spilled registers (ptxas -v calls it
"stack frame"; its "spill stores" count store instructions' bytes, which can be more).

    python -m tests.gpu_compile [--arch 80 90] [--json] [--full | --pvt [--input H W BATCH ...]]

The default cases (~130 launches, ~160 CPU seconds: under 1.5 minutes on 2 free cores) are one per PVT
stage and head-dim regime, covering every launcher branch (strided / linear, keys in one block / looped,
deterministic / atomic) in fp32 and bf16, and fp16 once (its plans are bf16's: same shared memory, registers
within a few). ``--full`` compiles the whole matrix (sr 2/4/8 x C 64/128/320/512, linear C 64..512, every
(M, d) of M 49/256/1024 x d 32/40/64/128, deterministic and atomic, three dtypes: ~480 launches, ~10
minutes on 2 cores). ``--pvt`` compiles the hot launches of pvt_v2_b2's real shapes (512x512 batch 16 and 224x224
batch 64, bf16) as the plans route them; ``--input 800 1333 2`` (repeatable) compiles them at other inputs instead,
e.g. detection's (N ~ 67k queries against M ~ 1k keys at stage 1). The table also says which tensor-core
instructions each launch's SASS holds: on Hopper ``wgmma`` is what a hot launch wants; ``mma.sync`` means an sm_80-style tile.
Run without TRITON_INTERPRET=1 (under the interpreter @triton.jit gives interpreted functions).
Exit status: 0 all compiled; 1 a compile failed; 77 no toolchain here (nvidia backend or bundled ptxas).

Assumptions: meta tensors have data_ptr() == 0, so every pointer is specialised as 16-byte aligned, as PVT's
tensors are (fresh allocations; head and k/v column slices start at multiples of 16 bytes). The attention
plan sizes its grid by the SM count, stubbed per arch (A100 108, H100 132 SMs); it changes only how many
dK/dV partials there are (an int argument, a constexpr when it is 1).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
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

EXIT_SKIP = 77
SM_COUNT = {80: 108, 90: 132}
"""SMs of each arch's reference part (A100, H100 SXM): what the attention plan sees on that GPU."""

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ALL, WIDE = (F32, F16, BF16), (F32, BF16)

# Cases: (shape, dtypes). Spatial shape (B, H, W, C, sr, linear); attention shape (B, N, M, heads, d, deterministic)
# with N queries, M keys (an sr-reduced grid) and heads * d = the stage's channels.
CASES = dict(
    spatial=(
        ((2, 56, 56, 64, 8, False), ALL),  # PVT stage 1 at 224 px
        ((2, 33, 50, 128, 4, False), WIDE),  # stage 2 width, H and W not multiples of sr (trailing rows/columns)
        ((2, 14, 14, 320, 2, False), WIDE),  # stage 3 at 224 px
        ((2, 7, 7, 512, 1, True), WIDE),  # PVTv2-li stage 4: pool to 7x7 + 1x1 conv + LayerNorm + GELU
    ),
    attention=(
        ((2, 3136, 49, 1, 64, True), ALL),  # PVT stage 1 at 224 px (56x56, sr 8, one head): keys in one block
        ((2, 3136, 49, 8, 40, True), WIDE),  # head_dim not a multiple of 16
        ((2, 16384, 256, 1, 32, True), WIDE),  # SegFormer stage 1 at 512 px (128x128, sr 8)
        ((2, 16384, 256, 4, 128, True), WIDE),  # largest head_dim: keys looped, the biggest tiles
        ((2, 4096, 1024, 2, 64, False), WIDE),  # long key set, fp32 atomics for dK/dV
        ((16, 256, 256, 8, 64, True), WIDE),  # N ~ M (PVT stage 4 at 512 px): the key-parallel backward
    ),
    projected=(  # (B, N, M, C, heads, save): q and out projections inside the attention kernel
        ((2, 3136, 49, 64, 1, True), ALL),  # stage 1 at 224 px, training (q, o, lse saved)
        ((2, 16384, 256, 64, 1, False), WIDE),  # stage 1 at 512 px, inference: keys looped
        ((2, 784, 49, 128, 2, True), WIDE),  # the widest x it takes
        ((2, 196, 49, 40, 5, False), WIDE),  # head_dim 8, C not a power of two
        ((2, 49, 49, 128, 2, True), WIDE),  # M = N: self attention, k and v projected in the kernel too (16-bit)
        ((2, 64, 64, 64, 1, False), ALL),  # the same, every dtype
    ),
)
FULL_CASES = dict(
    spatial=tuple(((2, hw, hw, c, sr, False), ALL) for hw, c in ((56, 64), (28, 128), (14, 320), (16, 512))
                  for sr in (2, 4, 8))
    + (((2, 33, 50, 128, 4, False), ALL),)
    + tuple(((2, hw, hw, c, 1, True), ALL) for hw, c in ((56, 64), (28, 128), (14, 320), (7, 512))),
    attention=tuple(((b, n, m, h, d, det), ALL) for b, n, m in ((2, 3136, 49), (2, 16384, 256), (2, 4096, 1024),
                                                                 (16, 256, 256))
                    for h, d in ((1, 32), (1, 64), (8, 40), (4, 128)) for det in (True, False)),
    projected=tuple(((2, n, m, c, h, save), ALL) for n, m in ((3136, 49), (16384, 256), (49, 49), (64, 64))
                    for c, h in ((32, 1), (64, 1), (128, 2), (40, 5)) for save in (True, False)),
)


PVT_INPUTS = (((512, 512), 16), ((224, 224), 64))
"""((H, W), batch) of the inputs ``--pvt`` compiles by default: segmentation and classification training sizes."""


def pvt_cases(model: str = "pvt_v2_b2", dtype: torch.dtype = BF16, inputs=PVT_INPUTS) -> dict:
    """The hot launches of ``model`` at each ((H, W), batch) of ``inputs``, stage by stage as the plans of
    :mod:`sra_kernels.plan` route them: the reduction where the stage reduces, the attention (inference and
    training), and the fused-projection kernels where that path applies."""
    from sra_kernels.plan import Problem, fused_projections_refuse
    from sra_kernels.shapes import model_stages

    cases = dict(spatial=[], attention=[], projected=[])
    for size, batch in inputs:
        for s in model_stages(model, size, batch):
            if s.reduces:
                cases["spatial"].append(((batch, s.height, s.width, s.channels, s.sr_ratio, s.linear), (dtype,)))
            cases["attention"].append(((batch, s.tokens, s.reduced_tokens, s.heads, s.head_dim, True), (dtype,)))
            if fused_projections_refuse(Problem.of_shape(s, dtype, True)) is None:
                cases["projected"] += [((batch, s.tokens, s.reduced_tokens, s.channels, s.heads, save), (dtype,))
                                       for save in (True, False)]
    return {kind: tuple(dict.fromkeys(found)) for kind, found in cases.items()}


class Launch(NamedTuple):
    """One distinct kernel launch, ready for triton.compile (picklable)."""

    module: str  # module holding the kernel
    kernel: str  # kernel name
    arch: int
    dtype: str  # the case's dtype, e.g. "bfloat16"
    case: str  # the first launcher call that made it, e.g. "spatial B2 56x56 C64 sr8"
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # num_warps, num_stages as the launcher passed them


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
def _recording(arch: int):
    """Swap every ``*_kernel`` of the op modules for a recorder, and make the plans see an ``arch`` GPU (its SM
    count and compute capability); yields the list the launches go to."""
    from triton.runtime.jit import JITFunction

    from sra_kernels.ops import attention, column_sum, projected_attention, spatial_reduce

    launches: list = []
    sm_count = SM_COUNT[arch]
    patches = {(attention, "_num_sms"): lambda device: sm_count,
               (projected_attention, "_num_sms"): lambda device: sm_count,
               (attention, "_capability"): lambda device: divmod(arch, 10),
               (projected_attention, "_capability"): lambda device: divmod(arch, 10),
               (attention, "_check_launchable"): _allow_meta(attention._check_launchable)}
    attention._plan.cache_clear()  # the plans depend on the (stubbed) SM count
    projected_attention._plan.cache_clear()
    for module in (spatial_reduce, attention, projected_attention, column_sum):
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


def _run_spatial(B, H, W, C, sr, linear, dtype) -> str:
    """spatial_reduce_forward + backward, and the q bias gradient's column sum, on meta tensors, with the conv weight
    as the module keeps it (channels_last, read in place) and as a standard-layout weight's copy (tap-major);
    the case label."""
    from sra_kernels.ops.column_sum import column_sum
    from sra_kernels.ops.spatial_reduce import (
        kv_max_channels,
        reduce_and_project_kv,
        spatial_reduce_backward,
        spatial_reduce_forward,
        tap_major_layout,
    )

    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(B, H * W, C, **meta)
    vec = torch.empty(C, **meta)
    k = 1 if linear else sr
    for weight in (torch.empty(C, C, k, k, **meta).contiguous(memory_format=torch.channels_last),
                   tap_major_layout(torch.empty(C, C, k, k, **meta))):
        y, *saved = spatial_reduce_forward(x, H, W, weight, vec, vec, vec, sr, linear, 1e-5)
        if C <= kv_max_channels(dtype):  # the kv projection in the forward kernel's epilogue
            kv_weight, kv_bias = torch.empty(2 * C, C, **meta), torch.empty(2 * C, **meta)
            reduce_and_project_kv(x, H, W, weight, vec, vec, vec, sr, linear, 1e-5, kv_weight, kv_bias)
        spatial_reduce_backward(torch.empty_like(y), x, H, W, weight, vec, vec, vec, *saved, sr, linear, 1e-5)
    column_sum(x.view(-1, C), dtype)
    return f"spatial B{B} {H}x{W} C{C} " + ("linear" if linear else f"sr{sr}")


def _run_attention(B, N, M, h, d, deterministic, dtype) -> str:
    """attention_forward + backward (with the bias-gradient partials) on meta tensors; returns the case label.

    q is a (B, N, h*d) projection viewed per head; k and v are the halves of a (B, M, 2, h, d) projection.
    """
    from sra_kernels.ops.attention import attention_backward, attention_forward

    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(B, N, h * d, **meta).view(B, N, h, d)
    kv = torch.empty(B, M, 2, h, d, **meta)
    o, lse = attention_forward(q, kv[:, :, 0], kv[:, :, 1], d ** -0.5)
    attention_backward(torch.empty_like(o), q, kv[:, :, 0], kv[:, :, 1], o, lse, d ** -0.5, deterministic,
                       bias_partials=True)
    return f"attention B{B} N{N} M{M} h{h} d{d} " + ("det" if deterministic else "atomic")


def _run_projected(B, N, M, C, h, save, dtype) -> str:
    """projected_attention_forward on meta tensors (k, v halves of a (B, M, 2, h, d) projection), or, where the
    plan of sr = 1 (M = N) routes to one kernel and the kernel takes C, projected_self_attention_forward (k, v
    projected in the kernel); the case label."""
    from sra_kernels.ops.projected_attention import (
        projected_attention_forward,
        projected_self_attention_forward,
        self_attention_max_channels,
    )
    from sra_kernels.plan import Problem, make_plan

    meta = dict(device="meta", dtype=dtype)
    x, weight, bias = torch.empty(B, N, C, **meta), torch.empty(C, C, **meta), torch.empty(C, **meta)
    sr = 1 if M == N else 2  # any reducing ratio: the route only asks whether keys come from x
    route = make_plan("fused_projections", Problem(B, N, M, C, h, sr, False, dtype, save), True, "compile case").route
    if route == "project_attend_self" and C <= self_attention_max_channels(dtype):
        kv_weight, kv_bias = torch.empty(2 * C, C, **meta), torch.empty(2 * C, **meta)
        projected_self_attention_forward(x, weight, bias, kv_weight, kv_bias, weight, bias, h, (C // h) ** -0.5, save)
    else:
        kv = torch.empty(B, M, 2, h, C // h, **meta)
        projected_attention_forward(x, weight, bias, kv[:, :, 0], kv[:, :, 1], weight, bias, (C // h) ** -0.5, save)
    return f"projected B{B} N{N} M{M} C{C} h{h} " + ("save" if save else "infer")


def capture(archs, cases=CASES) -> list[Launch]:
    """Every distinct launch of the cases, specialised as the runtime would for each arch (attention first:
    its backward kernels take longest to compile, so they start first)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    distinct: dict = {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders: dict = {}
        for run, op_cases in ((_run_attention, cases["attention"]), (_run_projected, cases["projected"]),
                              (_run_spatial, cases["spatial"])):
            for shape, dtypes in op_cases:
                for dtype in dtypes:
                    with _recording(arch) as launches:
                        case = run(*shape, dtype)
                    for fn, args, kwargs in launches:
                        if fn not in binders:
                            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
                        bound, spec, options = binders[fn](*args, **kwargs)
                        key = (arch, fn.__module__, fn.__name__, str(spec), str(options))
                        if key not in distinct:
                            distinct[key] = _launch(fn, arch, str(dtype)[6:], case, bound, spec, options, backend)
    return list(distinct.values())


def _launch(fn, arch, dtype, case, bound, spec, options, backend) -> Launch:
    """The triton.compile inputs of one launch from the binder's (bound args, specialisation, options).

    Arguments are flat (no tuples), so argument i has path (i,), as the runtime's find_paths_if gives.
    """
    kinds = [s[0] for s in spec]
    constexprs = {(i,): value for i, value in enumerate(bound.values()) if kinds[i] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str) and s[1]}
    return Launch(fn.__module__, fn.__name__, arch, dtype, case, dict(zip(bound, kinds)), constexprs, attrs,
                  dict(options))


# --------------------------------------------------------------------------------------------------
# Compile
# --------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path of a CUDA binary bundled in the triton wheel."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def toolchain_problem() -> str | None:
    """Why the kernels cannot be compiled for NVIDIA targets here, or None."""
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
    """Compile one launch; its report row: shared bytes, registers and stack bytes per thread, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(launch.signature)
    row = dict(kernel=launch.kernel, arch=launch.arch, dtype=launch.dtype, case=launch.case,
               num_warps=launch.options.get("num_warps"), num_stages=launch.options.get("num_stages"),
               constexprs={names[i]: value for (i,), value in launch.constexprs.items() if names[i].isupper()})
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    start = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", launch.arch, 32), options=launch.options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(kernel.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin.name],
                                   capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin.name],
                                  capture_output=True, text=True, check=True).stdout
    except Exception as error:  # noqa: BLE001 -- reported per launch; the run exits non-zero
        return dict(row, ok=False, error=_describe(error))
    return dict(row, ok=True, num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                shared=kernel.metadata.shared, registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                spill=int(re.search(r"STACK:(\d+)", usage).group(1)), mma=_mma_kind(sass),
                seconds=round(time.perf_counter() - start, 2))


def _mma_kind(sass: str) -> str:
    """The tensor-core instructions of a kernel's SASS: "wgmma" (Hopper's HGMMA), "mma.sync" (HMMA, sm_80-style
    tiles; on sm_90 any tile under 64 rows), both, or "none" (FMA only)."""
    kinds = [name for name, op in (("wgmma", "HGMMA"), ("mma.sync", "HMMA")) if re.search(rf"\b{op}\b", sass)]
    return "+".join(kinds) or "none"


def _describe(error: Exception) -> str:
    """The innermost CompilationError of the chain (source line and reason), else the error; last 25 lines."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(cause)
    located = [e for e in chain if type(e).__name__ == "CompilationError"]
    error = located[-1] if located else error
    lines = str(error).strip().splitlines() or [repr(error)]
    return f"{type(error).__name__}: " + "\n".join(lines[-25:])


def compile_all(launches: list[Launch], workers: int) -> list[dict]:
    """Report rows of every launch, compiled on `workers` forked processes."""
    if workers <= 1:
        return [compile_launch(launch) for launch in launches]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(compile_launch, launches))


def format_table(rows: list[dict]) -> str:
    """One line per launch: arch, kernel, dtype, warps, stages, smem, registers, spill, case and blocks."""
    lines = [f"{'arch':<5} {'kernel':<29} {'dtype':<8} {'w':>1} {'s':>1} {'smem':>6} {'regs':>4} {'spill':>5}"
             f" {'mma':<14}  case | blocks"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["dtype"], r["case"])):
        head = f"sm_{r['arch']:<2} {r['kernel']:<29} {r['dtype']:<8} {r['num_warps']:>1} {r['num_stages']:>1}"
        blocks = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK"))
        if r["ok"]:
            lines.append(f"{head} {r['shared']:>6} {r['registers']:>4} {r['spill']:>5} {r['mma']:<14}  {r['case']} | "
                         f"{blocks}")
        else:
            lines.append(f"{head} FAILED  {r['case']} | {blocks}\n    " + r["error"].replace("\n", "\n    "))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(SM_COUNT), choices=sorted(SM_COUNT))
    parser.add_argument("--json", action="store_true", help="print the report rows as a JSON list")
    parser.add_argument("--full", action="store_true", help="the whole case matrix (~10 minutes on 2 cores)")
    parser.add_argument("--pvt", action="store_true", help="the hot launches of pvt_v2_b2's real shapes (bf16)")
    parser.add_argument("--input", type=int, nargs=3, action="append", metavar=("H", "W", "BATCH"),
                        help="with --pvt: compile at this input (repeatable) instead of 512x512 B16 and 224x224 B64")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: under the interpreter @triton.jit gives interpreted functions")
    problem = toolchain_problem()
    if problem:
        print(f"SKIP: {problem}", file=sys.stderr)
        return EXIT_SKIP
    start = time.perf_counter()
    if args.input and not args.pvt:
        parser.error("--input goes with --pvt")
    inputs = tuple(((h, w), batch) for h, w, batch in args.input) if args.input else PVT_INPUTS
    cases = pvt_cases(inputs=inputs) if args.pvt else FULL_CASES if args.full else CASES
    rows = compile_all(capture(args.arch, cases), args.workers)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows)} distinct launches, {failed} failed, {time.perf_counter() - start:.0f} s "
          f"on {args.workers} workers", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
