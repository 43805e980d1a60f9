"""Test set-up: kernels run under the Triton interpreter on CPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` runs, so it is set here, before
avss_fast is imported. CPU tensors then *could* take the Triton path by default; tests
default to the fused torch path (what CPU users run) and ask for ``triton`` explicitly
through the ``backend`` fixture or ``AVSS_FAST_BACKEND``. On a CUDA machine,
``AVSS_FAST_GPU_TESTS=1`` leaves the interpreter off for the GPU tests (``-m gpu``).
"""

import os

GPU_RUN = os.environ.get("AVSS_FAST_GPU_TESTS") == "1"  # tests/test_gpu.py on a CUDA machine
if not GPU_RUN:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("AVSS_FAST_BACKEND", "torch")
os.environ.setdefault("AVSS_FAST_NATIVE", "1")  # the compiled CPU kernel must build: no silent fallback
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test once per fast backend (triton = kernels under the interpreter)."""
    monkeypatch.setenv("AVSS_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture(params=["torch-native", "torch-sdpa", "triton"])
def stats_backend(request, monkeypatch):
    """Head statistics by each implementation: the compiled CPU kernel (avss_fast/native.py),
    the torch path it replaces where it cannot be built (SDPA with extended values and a
    blocked max pass), and the Triton kernel under the interpreter."""
    backend, _, path = request.param.partition("-")
    monkeypatch.setenv("AVSS_FAST_BACKEND", backend)
    if path:
        monkeypatch.setenv("AVSS_FAST_NATIVE", "1" if path == "native" else "0")
    return request.param


def assert_close_verbose(actual, expected, *, rtol, atol, what=""):
    """allclose with a message that names the field and the size of the miss."""
    a, e = float(actual), float(expected)
    err = abs(a - e)
    bound = atol + rtol * abs(e)
    assert err <= bound, f"{what}: got {a!r}, expected {e!r}, |diff| {err:.3g} > {bound:.3g} (rtol={rtol}, atol={atol})"


def assert_moments_close(got, ref, *, rtol=1e-5, atol=1e-6, fields=None):
    """Counts must match exactly; float fields within tolerance."""
    g, r = got.raw(), ref.raw()
    for k in fields or g:
        if isinstance(r[k], int):
            assert g[k] == r[k], f"{k}: got {g[k]}, expected {r[k]}"
        else:
            assert_close_verbose(g[k], r[k], rtol=rtol, atol=atol, what=k)


def layer_moments_fast_kernel_only(monkeypatch):
    """Switch off layer_moments' second launch (the mask pass of ranges with holes and the
    exact pass), so that a test sees the fast kernel's partials and marks as it left them."""
    import avss_fast.kernels.layer_moments as lm

    class Off:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(lm, "_layer_moments_exact_kernel", Off())


def nan_filled_empty(monkeypatch):
    """Make ``torch.empty`` fill floating buffers with NaN and integer ones with -12345
    (until ``monkeypatch.undo()`` or the test's end): a slot that a kernel should write and
    does not shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            return out.fill_(float("nan"))
        return out if out.dtype == torch.bool else out.fill_(-12345)

    monkeypatch.setattr(torch, "empty", empty)


def similarity_overflow_case(dtype):
    """(a, b, cos) for block_similarity: [2, 5, 40] rows of finite values whose fp32 squares
    overflow in one vector, in both, or near FLT_MAX, beside ordinary rows of the same tile;
    ``cos`` the float64 per-row cosines [10]."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 40, generator=g)
    b = a + 0.3 * torch.randn(2, 5, 40, generator=g)
    a[0, 1] *= 3e19  # |a|^2 overflows, b ordinary
    b[0, 1] *= 2e-3
    a[0, 3] *= 1e25  # both overflow
    b[0, 3] *= -4e24
    b[1, 2] *= 5e36  # only b, near the top of the range
    b[1, 4] = a[1, 4] * 1e-6 + 1e-7 * b[1, 4]  # |b| ~ 6e-6: the eps floor must scale with the rescaled a
    a[1, 4] *= 2e19
    a, b = a.to(dtype), b.to(dtype)
    cos = torch.nn.functional.cosine_similarity(a.double().flatten(0, 1), b.double().flatten(0, 1), dim=-1)
    return a, b, cos
