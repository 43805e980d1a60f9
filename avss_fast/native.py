"""The compiled CPU kernel for attention with per-row head statistics
(``csrc/head_stats_attention.cpp``), built on first use with the system C++ compiler and
called through ctypes.

Why it exists: torch's CPU flash kernel returns each row's log-sum-exp but neither its
largest logit nor ``sum_j p_j s_j`` (for the entropy), and it needs one head size for q, k
and v, so the torch path widens q/k/v by the keys and segment one-hots (24 -> 50 columns
on the demo LM) and adds a second blocked pass over q k^T for the max. The compiled kernel
does everything in one online-softmax pass at the narrow width.

Build: ``$CXX`` (or ``c++``/``g++``/``clang++``) with ``-O3 -march=native -fopenmp``,
falling back to fewer flags; the library is cached under ``$AVSS_FAST_CACHE`` (default
``~/.cache/avss_fast``), keyed by the source, flags, compiler and CPU, and written
atomically (concurrent processes are safe). With OpenMP the kernel runs in torch's own
OpenMP pool (the runtime torch already loaded shares its soname), sized by
``torch.get_num_threads()``.

``AVSS_FAST_NATIVE``: ``auto`` (default: use it when it builds, else warn once and use the
torch path), ``0`` (never), ``1`` (required: raise when it cannot be built).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .reference import segment_ids

SOURCE = Path(__file__).parent / "csrc" / "head_stats_attention.cpp"
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native", "-pthread"],
    ["-O3", "-pthread"],
)

_lock = threading.Lock()
_state: dict = {}  # "lib": ctypes function or None once tried; "error": why not


def mode() -> str:
    m = os.environ.get("AVSS_FAST_NATIVE", "auto").strip().lower() or "auto"
    if m not in ("auto", "0", "1"):
        raise ValueError(f"AVSS_FAST_NATIVE={m!r}: expected auto, 0 or 1")
    return m


def cache_dir() -> Path:
    root = os.environ.get("AVSS_FAST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "avss_fast"


def _compiler() -> str | None:
    cands = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for c in cands:
        path = shutil.which(c)
        if path:
            return path
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and flags (a cache shared across
    machines must not hand one CPU's build to another)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cxx: str, defines=()) -> Path:
    """Compile the kernel (first flag set that works) into the cache; the path of the library.
    ``defines``: extra ``-D`` macros (tests build the 8-wide variant with ``AVSS_VL=8``)."""
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    out_dir = cache_dir()
    errors = []
    for flags in _FLAG_SETS:
        flags = [*flags, *(f"-D{d}" for d in defines)]
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(), _cpu_id().encode(),
                                         platform.machine().encode()])).hexdigest()[:20]
        lib = out_dir / f"head_stats_attention-{key}.so"
        if lib.exists():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cxx, *flags, "-std=c++17", "-fPIC", "-shared", str(SOURCE), "-o", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            res = None
            errors.append(f"{' '.join(flags)}: {e}")
        if res is not None and res.returncode == 0:
            os.replace(tmp, lib)  # atomic: a concurrent build of the same key writes the same bytes
            return lib
        if res is not None:
            errors.append(f"{' '.join(flags)}: {(res.stderr or res.stdout).strip()[-400:]}")
        Path(tmp).unlink(missing_ok=True)
    raise RuntimeError("could not compile " + SOURCE.name + ":\n" + "\n".join(errors))


def _load(defines=()):
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    lib = ctypes.CDLL(str(_build(cxx, defines)))
    fn = lib.avss_head_stats_attention
    fn.argtypes = [P, L, L, L, P, P, P, L, L, L, P, I, P, L, L, L, P, P] + [I] * 10 + [ctypes.c_float, I]
    fn.restype = I
    fn.vector_width = int(lib.avss_vector_width())  # head dims pad to it, keys to twice it
    return fn


def kernel():
    """The compiled entry point, or None (``AVSS_FAST_NATIVE=0``, or it could not be built:
    warned once). Raises with ``AVSS_FAST_NATIVE=1`` when it cannot be built."""
    m = mode()
    if m == "0":
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"] = _load()
                except Exception as e:  # noqa: BLE001 - any build or load failure means: no native kernel
                    _state["lib"], _state["error"] = None, f"{type(e).__name__}: {e}"
                    if m == "auto":
                        warnings.warn(
                            "avss_fast: the compiled CPU attention-statistics kernel is unavailable "
                            f"({_state['error'][:300]}); using the slower torch path "
                            "(AVSS_FAST_NATIVE=0 silences this)", RuntimeWarning, stacklevel=3)
    if _state["lib"] is None and m == "1":
        raise RuntimeError(f"AVSS_FAST_NATIVE=1 but the compiled kernel is unavailable: {_state['error']}")
    return _state["lib"]


def supports(q: torch.Tensor) -> bool:
    """Whether the compiled kernel takes this call: CPU tensors in fp32/bf16/fp16 (fp64 keeps
    the torch path's fp64 arithmetic)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)


def head_stats_attention(fn, q, k, v, *, scaling: float, causal: bool, attn_mask=None, segment_starts=None,
                         want_mass: bool = False):
    """Attention and its per-row statistics in one pass (``fn`` from :func:`kernel`).

    q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hv, Sk, D] (Hk and Hv divide Hq: grouped
    query heads share a kv head); ``causal`` bottom-right (row i sees key j <= i + Sk - Sq);
    ``attn_mask`` bool [B, 1|Hq, Sq, Sk] (True = attend) or None; ``segment_starts`` [B, S].

    Returns ``(out [B, Hq, Sq, D] fp32, stats [B, Hq, Sq, 3] = (entropy, max logit, sink
    mass), mass [B, Hq, Sq, S] or None)``; ``mass`` (S = 1 without segments) only with
    ``want_mass``. Rows with no allowed key: out 0, entropy 0, max logit -inf, sink 0."""
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    Hv = v.shape[1]
    if Hq % Hk or Hq % Hv or v.shape[2] != Sk or v.shape[3] != D or k.shape[3] != D:
        raise ValueError(f"head_stats_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    VL = fn.vector_width
    Dp = -(-D // VL) * VL
    Skp = -(-Sk // (2 * VL)) * (2 * VL)
    qf = q.float()
    if qf.stride(-1) != 1:
        qf = qf.contiguous()
    kt = k.new_zeros(B, Hk, D, Skp, dtype=torch.float32)
    kt[..., :Sk] = k.transpose(-1, -2)
    vp = (F.pad(v.float(), (0, Dp - D)) if Dp != D else v.float()).contiguous()
    out = torch.empty(B, Sq, Hq, Dp).transpose(1, 2)  # written as [B, Sq, Hq, D]: what the caller returns
    stats = torch.empty(B, Hq, Sq, 3)
    seg, S, mass = None, 0, None
    if want_mass or segment_starts is not None:
        if segment_starts is not None:
            seg = segment_ids(segment_starts.to(torch.long), Sk).to(torch.int32).contiguous()
            S = segment_starts.shape[1]
        else:
            seg, S = torch.zeros(B, Sk, dtype=torch.int32), 1
        if want_mass:
            mass = torch.empty(B, Hq, Sq, S)
        else:
            seg, S = None, 0
    mk, m_strides = None, (0, 0, 0)
    if attn_mask is not None:
        mk = attn_mask.to(torch.bool)
        if mk.stride(-1) != 1:
            mk = mk.contiguous()
        mk = mk.view(torch.uint8)
        m_strides = (mk.stride(0), mk.stride(1) if mk.shape[1] > 1 else 0, mk.stride(2))

    def ptr(t):
        return None if t is None else t.data_ptr()

    rc = fn(ptr(qf), qf.stride(0), qf.stride(1), qf.stride(2), ptr(kt), ptr(vp), ptr(mk), *m_strides,
            ptr(seg), S, ptr(out), out.stride(0), out.stride(1), out.stride(2), ptr(stats), ptr(mass),
            B, Hq, Hk, Hv, Sq, Sk, Skp, D, Dp, int(bool(causal)), float(scaling), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"head_stats_attention kernel failed (code {rc}: 1 = out of memory, 2 = bad layout)")
    return (out[..., :D] if Dp != D else out), stats, mass
