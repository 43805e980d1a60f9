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
