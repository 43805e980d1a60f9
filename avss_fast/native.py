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
``~/.cache/avss_fast``; a private folder in the temporary directory when that cannot be
written), keyed by the source, flags, compiler, CPU and OpenMP runtime. It is compiled in
a private folder and moved in whole (concurrent processes are safe), readable by all. With
OpenMP the kernel runs in torch's own OpenMP pool, sized by ``torch.get_num_threads()``:
the runtime torch loaded is reused by soname (``libgomp.so.1``) or, under another name,
linked explicitly (:func:`openmp_runtime`).

``AVSS_FAST_NATIVE``: ``auto`` (default: use it when it builds, else warn once and use the
torch path), ``0`` (never), ``1`` (required: raise when it cannot be built).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
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


def _out_dirs() -> list[Path]:
    """Where a build may go: the cache, else a private folder in the temporary directory
    (a read-only or missing home)."""
    dirs = []
    try:
        dirs.append(cache_dir())
    except (RuntimeError, KeyError):  # Path.home() without a home
        pass
    uid = os.getuid() if hasattr(os, "getuid") else 0
    dirs.append(Path(tempfile.gettempdir()) / f"avss_fast-{uid}")
    return dirs


def _compiler() -> list[str] | None:
    """The compiler command (``$CXX`` may carry arguments, e.g. ``ccache g++``)."""
    if os.environ.get("CXX"):
        cmd = shlex.split(os.environ["CXX"])
        return cmd if cmd and shutil.which(cmd[0]) else None
    for c in ("c++", "g++", "clang++"):
        path = shutil.which(c)
        if path:
            return [path]
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


def openmp_runtime() -> str | None:
    """The OpenMP runtime this process has loaded (torch's), from /proc/self/maps; None if
    none is visible. A runtime named other than ``libgomp.so.1`` (a renamed bundled copy,
    Intel's libiomp5) is linked explicitly, so that the kernel runs on torch's thread pool
    and not on a second one competing with it."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split()
        name = os.path.basename(parts[-1]) if len(parts) >= 6 else ""
        if name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in name:
            return parts[-1]
    return None


def _commands(cxx, flags, out: Path, runtime):
    """Compiler invocations that build the library at ``out`` with ``flags``."""
    common = [*cxx, *flags, "-std=c++17", "-fPIC"]
    if "-fopenmp" in flags and runtime and os.path.basename(runtime) != "libgomp.so.1":
        obj = out.with_suffix(".o")
        return [[*common, "-c", str(SOURCE), "-o", str(obj)],
                [*cxx, "-shared", str(obj), runtime, f"-Wl,-rpath,{os.path.dirname(runtime)}", "-o", str(out)]]
    return [[*common, "-shared", str(SOURCE), "-o", str(out)]]


def _build(cxx, defines=(), *, dirs=None, runtime: str | None = "auto", skip: Path | None = None) -> Path:
    """Compile the kernel (first flag set that works) into the cache; the path of the library.
    ``defines``: extra ``-D`` macros (tests build the 8-wide variant with ``AVSS_VL=8``);
    ``runtime``: the OpenMP runtime to link ("auto": :func:`openmp_runtime`); ``skip``: a
    cached library that would not load (built anew elsewhere)."""
    src = SOURCE.read_bytes()
    if runtime == "auto":
        runtime = openmp_runtime()
    try:
        version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    dirs = _out_dirs() if dirs is None else dirs
    errors = []
    for flags in _FLAG_SETS:
        flags = [*flags, *(f"-D{d}" for d in defines)]
        key = hashlib.sha256(b"\0".join(x.encode() for x in [
            " ".join(flags), version, _cpu_id(), platform.machine(), str(runtime)]) + src).hexdigest()[:20]
        name = f"head_stats_attention-{key}.so"
        for d in dirs:
            lib = d / name
            if lib.exists() and lib != skip:
                return lib
        out_dir = None
        for d in dirs:
            if (d / name) == skip:
                continue
            try:
                d.mkdir(parents=True, exist_ok=True)
                work = Path(tempfile.mkdtemp(prefix=".build-", dir=d))
                out_dir = d
                break
            except OSError as e:
                errors.append(f"{d}: {e}")
        if out_dir is None:
            break
        try:  # the compiler writes into a private folder; the finished library is moved in whole
            res = None
            for cmd in _commands(cxx, flags, work / name, runtime):
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if res.returncode != 0:
                    break
            if res is not None and res.returncode == 0:
                os.chmod(work / name, 0o755)  # other users of a shared cache can load it
                os.replace(work / name, out_dir / name)  # atomic; a concurrent build writes the same bytes
                return out_dir / name
            errors.append(f"{' '.join(flags)}: {(res.stderr or res.stdout).strip()[-400:]}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(flags)}: {e}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    raise RuntimeError("could not compile " + SOURCE.name + ":\n" + "\n".join(errors))


def _load(defines=(), **build):
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    cxx = _compiler()
    if cxx is None and os.environ.get("CXX"):
        raise RuntimeError(f"CXX={os.environ['CXX']!r} names no program on PATH (fix or unset CXX: without it "
                           "c++, g++ and clang++ are tried)")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    path = _build(cxx, defines, **build)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a cached library this process cannot load (permissions, a foreign build): build anew
        lib = ctypes.CDLL(str(_build(cxx, defines, skip=path, **build)))
    fn = lib.avss_head_stats_attention
    fn.argtypes = [P, L, L, L, P, P, P, L, L, L, P, I, P, L, L, L, P, P] + [I] * 10 + [ctypes.c_float, I]
    fn.restype = I
    fn.vector_width = int(lib.avss_vector_width())  # head dims pad to it, keys to twice it
    return fn


class NativeUnavailableError(RuntimeError):
    """``AVSS_FAST_NATIVE=1`` and the compiled kernel could not be built or loaded."""


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
                    _state["error"] = f"{type(e).__name__}: {e}"
                    _state["lib"] = None  # set last: readers outside the lock see "error" first
                    if m == "auto":
                        warnings.warn(
                            "avss_fast: the compiled CPU attention-statistics kernel is unavailable "
                            f"({_state['error'][:300]}); using the slower torch path "
                            "(AVSS_FAST_NATIVE=0 silences this)", RuntimeWarning, stacklevel=3)
    if _state["lib"] is None and m == "1":
        raise NativeUnavailableError(f"AVSS_FAST_NATIVE=1 but the compiled kernel is unavailable: {_state['error']}")
    return _state["lib"]


def unavailable_reason() -> str | None:
    """Why :func:`kernel` gave None (the build or load error, or the switch), else None."""
    if mode() == "0":
        return "AVSS_FAST_NATIVE=0"
    return _state.get("error")


def supports(q: torch.Tensor) -> bool:
    """Whether the compiled kernel takes this call: CPU tensors in fp32/bf16/fp16 (fp64 keeps
    the torch path's fp64 arithmetic)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)


def head_stats_attention(fn, q, k, v, *, scaling: float, causal: bool, attn_mask=None, segment_starts=None,
                         want_mass: bool = False, seg_ids=None):
    """Attention and its per-row statistics in one pass (``fn`` from :func:`kernel`).

    q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hv, Sk, D] (Hk and Hv divide Hq: grouped
    query heads share a kv head); ``causal`` bottom-right (row i sees key j <= i + Sk - Sq);
    ``attn_mask`` bool [B, 1|Hq, Sq, Sk] (True = attend) or None; ``segment_starts`` [B, S]
    (``seg_ids``: its ``segment_ids(segment_starts, Sk)`` when the caller has them already).

    Returns ``(out [B, Hq, Sq, D] fp32, stats [B, Hq, Sq, 3] = (entropy, max logit, sink
    mass), mass [B, Hq, Sq, S] or None)``; ``mass`` (S = 1 without segments) only with
    ``want_mass``. Rows with no allowed key: out 0, entropy 0, max logit -inf, sink 0; rows
    with a NaN or +Inf logit among their allowed keys: NaN everywhere."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"head_stats_attention: q, k, v must be 4-D, got {q.dim()}, {k.dim()}, {v.dim()}")
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    Hv = v.shape[1]
    if (k.shape[0] != B or v.shape[0] != B or Hq % Hk or Hq % Hv
            or v.shape[2] != Sk or v.shape[3] != D or k.shape[3] != D):
        raise ValueError(f"head_stats_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    for t in (q, k, v):
        if t.device.type != "cpu":
            raise ValueError(f"head_stats_attention runs on CPU tensors, got {t.device}")
    f32 = dict(dtype=torch.float32, device="cpu")  # whatever torch's default dtype and device
    VL = fn.vector_width
    Dp = -(-D // VL) * VL
    Skp = -(-Sk // (2 * VL)) * (2 * VL)
    qf = q.float()
    if qf.stride(-1) != 1:
        qf = qf.contiguous()
    kt = torch.zeros(B, Hk, D, Skp, **f32)
    kt[..., :Sk] = k.transpose(-1, -2)
    vp = (F.pad(v.float(), (0, Dp - D)) if Dp != D else v.float()).contiguous()
    out = torch.empty(B, Sq, Hq, Dp, **f32).transpose(1, 2)  # written as [B, Sq, Hq, D]: what the caller returns
    stats = torch.empty(B, Hq, Sq, 3, **f32)
    seg, S, mass = None, 0, None
    if want_mass:
        if segment_starts is not None:
            if segment_starts.dim() != 2 or segment_starts.shape[0] not in (1, B) or segment_starts.shape[1] < 1:
                raise ValueError(f"segment_starts must be [B or 1, S], got {tuple(segment_starts.shape)}")
            S = segment_starts.shape[1]
            seg = (seg_ids if seg_ids is not None else segment_ids(segment_starts.to(torch.long), Sk)).expand(B, Sk)
        else:
            S, seg = 1, torch.zeros(B, Sk, dtype=torch.long)
        seg = seg.to(torch.int32).contiguous()  # ids in [0, S): the kernel indexes its S sums with them
        mass = torch.empty(B, Hq, Sq, S, **f32)
    mk, m_strides = None, (0, 0, 0)
    if attn_mask is not None:
        ms = tuple(attn_mask.shape)
        if attn_mask.dim() != 4 or ms[0] not in (1, B) or ms[1] not in (1, Hq) or ms[2] not in (1, Sq) or ms[3] != Sk:
            raise ValueError(f"attn_mask must be [B or 1, Hq or 1, Sq or 1, Sk] = [{B}, {Hq}, {Sq}, {Sk}], got {ms}")
        mk = attn_mask.to(torch.bool)
        if mk.stride(-1) != 1:
            mk = mk.contiguous()
        mk = mk.expand(B, ms[1], Sq, Sk).view(torch.uint8)  # broadcast dimensions get stride 0
        m_strides = (mk.stride(0), mk.stride(1) if ms[1] > 1 else 0, mk.stride(2))

    def ptr(t):
        return None if t is None else t.data_ptr()

    rc = fn(ptr(qf), qf.stride(0), qf.stride(1), qf.stride(2), ptr(kt), ptr(vp), ptr(mk), *m_strides,
            ptr(seg), S, ptr(out), out.stride(0), out.stride(1), out.stride(2), ptr(stats), ptr(mass),
            B, Hq, Hk, Hv, Sq, Sk, Skp, D, Dp, int(bool(causal)), float(scaling), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"head_stats_attention kernel failed (code {rc}: 1 = out of memory, 2 = bad layout)")
    return (out[..., :D] if Dp != D else out), stats, mass
