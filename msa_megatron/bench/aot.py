"""Ahead-of-time compile report of Triton kernels for Hopper, without a GPU: registers, spills
and shared memory from Triton's own ptxas (the scripts' ``--aot`` options use it to check a
kernel change before device time is spent on it)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any, Dict, Iterable, Optional

#: sm_90's maximum dynamic shared memory per block (227 KB).
SM90_SMEM_LIMIT = 232448


def compile_report(name: str, fn, types: Dict[str, str], consts: Dict[str, Any], num_warps: int, num_stages: int,
                   arch: int = 90, ptr_default: Optional[str] = None, div16: Iterable[str] = (),
                   width: int = 58) -> bool:
    """Compile ``fn`` for sm_<arch>a and print one line (registers, spill bytes, shared memory,
    wgmma count); False on a compile error or shared memory above the sm_90 limit.

    Argument types: ``types[name]``, else ``ptr_default`` for upper-case names other than D and G
    (the kernels' pointer naming convention) when given, else i32. ``div16``: scalar names the
    JIT would see as multiples of 16 at the benchmark layout; pointers and strides always are."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    div16 = set(div16)

    def kind(n: str) -> str:
        if n in consts:
            return "constexpr"
        if n in types:
            return types[n]
        return ptr_default if ptr_default and n.isupper() and n not in ("D", "G") else "i32"

    sig = {n: kind(n) for n in fn.arg_names}
    attrs = None
    if ptr_default or div16:
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (sig[n].startswith("*") or n.startswith("stride") or n in div16)}
    try:
        ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ck.asm["ptx"])
        log = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o",
                              os.devnull], capture_output=True, text=True).stderr
        os.unlink(f.name)
    except Exception as exc:  # noqa: BLE001  (reported, the other kernels still compile)
        print(f"  {name:{width}s} COMPILE ERROR {type(exc).__name__}: {str(exc)[:800]}", flush=True)
        return False
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    too_big = ck.metadata.shared > SM90_SMEM_LIMIT
    print(f"  {name:{width}s} warps={num_warps} stages={num_stages} regs={regs.group(1) if regs else '?'} "
          f"spill={spill.group(1) if spill else '?'}B smem={ck.metadata.shared}B "
          f"wgmma={len(re.findall('wgmma.mma_async', ck.asm['ptx']))}{'  SMEM OVER 227 KB' if too_big else ''}",
          flush=True)
    return not too_big


__all__ = ["SM90_SMEM_LIMIT", "compile_report"]
