"""Start-up shared by the standalone GPU scripts: ``--out``, the Triton backend, and
avss_fast importable from the repository without installation."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def setup(description: str, extra=None) -> argparse.Namespace:
    """Parse ``--out`` (and what ``extra(parser)`` adds), force ``AVSS_FAST_BACKEND=triton``
    and make ``avss_fast`` (with its ``avss_fast.kernels``) importable, installed or not."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", help="write the results as JSON to this file")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    os.environ["AVSS_FAST_BACKEND"] = "triton"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import avss_fast.kernels  # noqa: F401  (installed package)
    except ImportError:  # source tree: kernels/ is avss_fast.kernels only once installed
        spec = importlib.util.spec_from_file_location(
            "avss_fast.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["avss_fast.kernels"] = mod
        spec.loader.exec_module(mod)
    return args


def padding_masks(torch, B: int, T: int, dev) -> dict:
    """The padding masks the stats benchmarks time ([B, T] int64, 1 = valid): ``light``, one
    sample of B half padded; ``ragged``, right padding of mixed lengths T/2..T (seeded);
    ``holes``, a hole every 7 tokens (every range through the second launch's mask pass)."""
    light = torch.ones(B, T, device=dev, dtype=torch.long)
    light[0, T // 2:] = 0
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g).to(dev)
    ragged = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).long()
    holes = torch.ones(B, T, device=dev, dtype=torch.long)
    holes[:, ::7] = 0
    return dict(light=light, ragged=ragged, holes=holes)
