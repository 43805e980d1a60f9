"""Triton device code for avss_fast (packaged as ``avss_fast.kernels``).

Kernels know tensors, not models. Each module holds ``_``-prefixed ``@triton.jit``
kernels and one launcher that validates, reshapes and builds the grid. Launchers
return small buffers and never synchronise with the host; ``layer_moments`` merges
its partials in float64 in two small kernels of its own.

Importing this package requires triton. On a CPU-only machine the kernels launch only
under the Triton interpreter: set ``TRITON_INTERPRET=1`` before this package is first
imported (interpreter mode is fixed when ``@triton.jit`` runs).
"""

from .layer_moments import layer_moments_packed, layer_moments_partials
from .block_similarity import block_similarity_rows

__all__ = ["layer_moments_packed", "layer_moments_partials", "block_similarity_rows"]
