"""The expert MLP's fused hidden as C kernels for the CPU (megamoe/csrc/expert_hidden.c), built on
first use with the system C compiler into a per-user cache and called through ctypes: no PyTorch
headers, a build of about a second. Where there is no compiler, the build fails, or
``MEGAMOE_CPU_KERNELS=0``, :func:`library` is None and megamoe/ops.py runs PyTorch ops instead (the
tested fallback). docs/ARCHITECTURE.md, "Expert MLP buffers": one pass over [N, I] instead of three
(forward) and seven (backward), which on a memory-bound CPU is most of the MLP's non-GEMM time."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "expert_hidden.c"
# -march=native: the cache key holds the CPU's flags, so another CPU builds its own copy.
# -fno-math-errno + the source's "declare simd" expf: glibc's vector expf (libmvec), IEEE semantics kept.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fopenmp-simd",
         "-shared", "-fPIC")
LIBS = ("-lmvec", "-lm")
ENABLED = os.environ.get("MEGAMOE_CPU_KERNELS", "1") != "0"
status = "not built yet"  # what library() did, for the start-up log and the tests


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


@functools.cache
def _build() -> ctypes.CDLL | None:
    global status
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        status = "unavailable: no C compiler (gcc / cc / $CC); PyTorch ops instead"
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS + LIBS).encode(), compiler.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("MEGAMOE_CACHE_DIR", "~/.cache/megamoe")).expanduser() / "kernels"
    target = cache / f"expert_hidden-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{target.name}.{os.getpid()}.tmp"  # written aside, renamed into place
        try:
            result = subprocess.run([compiler, *FLAGS, "-o", str(tmp), str(SOURCE), *LIBS],
                                    capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            status = f"unavailable: {compiler} failed to run ({err}); PyTorch ops instead"
            return None
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            status = f"unavailable: {compiler} failed ({last}); PyTorch ops instead"
            return None
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    for name in ("gated_forward", "gated_backward", "swiglu_forward", "swiglu_backward"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
        getattr(lib, name).restype = None
    status = f"compiled ({target})"
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled or unavailable: see ``status``)."""
    return _build() if ENABLED else None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels run for these operands: fp32 on the CPU, and the library loaded. Whatever
    the strides: the caller makes them contiguous, so every fp32 CPU call computes the same products
    the same way (a layout whose gradient arrives strided must not round differently). They write
    through data pointers, so call them only where autograd is not tracking (inside an autograd
    function's forward or backward)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) \
        and library() is not None


def run(name: str, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, width: int) -> None:
    """``name``(a, b, c, rows, width) on the data pointers (all contiguous); rows = c's elements /
    width."""
    if not (a.is_contiguous() and b.is_contiguous() and c.is_contiguous()):
        raise ValueError(f"{name}: the C kernels take contiguous operands")
    getattr(library(), name)(a.data_ptr(), b.data_ptr(), c.data_ptr(), c.numel() // width, width)
