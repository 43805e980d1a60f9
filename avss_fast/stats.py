"""Mergeable accumulators for streaming layer statistics.

Every field is a 0-dim tensor that lives on the device of the activations it was
computed from: float64 sums and int64 counts. Adding two accumulators is a handful of
tensor ops and never synchronises a GPU; only reading a derived value (``.item()``,
``to_dict()``) does.

Merging (Chan, Golub & LeVeque 1979): for two sets with counts ``n_a, n_b``, means
``mu_a, mu_b`` and sums of squared deviations ``M2_a, M2_b``::

    n     = n_a + n_b
    delta = mu_b - mu_a
    mu    = mu_a + delta * n_b / n
    M2    = M2_a + M2_b + delta**2 * n_a * n_b / n

which is exact in real arithmetic, so any grouping of batches (or ranks) gives the same
result up to float64 rounding.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

import torch

_F64 = torch.float64
_I64 = torch.int64


def _zero_f(device=None) -> torch.Tensor:
    return torch.zeros((), dtype=_F64, device=device)


def _zero_i(device=None) -> torch.Tensor:
    return torch.zeros((), dtype=_I64, device=device)


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) triples; counts may be zero. Works elementwise on tensors."""
    n = n_a + n_b
    n_f = n.to(_F64)
    safe = torch.where(n_f > 0, n_f, torch.ones_like(n_f))
    delta = mean_b - mean_a
    w_b = n_b.to(_F64) / safe
    mean = torch.where(n_f > 0, mean_a + delta * w_b, torch.zeros_like(delta))
    m2 = m2_a + m2_b + delta * delta * n_a.to(_F64) * w_b
    return n, mean, m2


def chan_reduce(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Merge a vector of (count, mean, M2) partials into one, in float64, without a loop.

    Uses the closed form of repeated Chan merges:
    ``mu = sum(n_i mu_i) / N``, ``M2 = sum(M2_i) + sum(n_i (mu_i - mu)^2)``.
    """
    n = n.to(_I64)
    n_f = n.to(_F64)
    mean = mean.to(_F64)
    m2 = m2.to(_F64)
    total = n.sum()
    total_f = total.to(_F64)
    safe = torch.where(total_f > 0, total_f, torch.ones_like(total_f))
    mu = (n_f * mean).sum() / safe
    dev = torch.where(n_f > 0, mean - mu, torch.zeros_like(mean))
    m2_tot = m2.sum() + (n_f * dev * dev).sum()
    return total, mu, m2_tot


def pooled_variance_from_columns(colsum: torch.Tensor, colcnt: torch.Tensor):
    """AVSS pooled variance from per-sample column sums and counts [B, D].

    Sample b's token mean is ``colsum / colcnt`` over the hidden units it has values for;
    returns (number of samples with at least two such units, sum over those samples of the
    unbiased variance of their token mean across hidden units), as 0-dim tensors.
    """
    colsum = colsum.to(_F64)
    zero = torch.zeros((), dtype=_F64, device=colsum.device)
    keep = colcnt > 0
    nd = keep.sum(1)
    mean_bd = colsum / colcnt.clamp(min=1)
    mu = torch.where(keep, mean_bd, zero).sum(1) / nd.clamp(min=1)
    var_b = torch.where(keep, (mean_bd - mu[:, None]) ** 2, zero).sum(1) / (nd - 1).clamp(min=1)
    has_var = nd >= 2
    return has_var.sum(), torch.where(has_var, var_b, zero).sum()


class _Accumulator:
    """Shared machinery: a frozen dataclass of 0-dim tensors, int64 counts and float64 sums.

    Subclasses list their fields in ``_counts`` (int64) and ``_sums`` (float64), in the
    dataclass's field order; plain tuples keep the hot paths free of ``dataclasses``
    introspection, which ``torch.compile`` cannot trace.
    """

    _counts: ClassVar[tuple[str, ...]] = ()
    _sums: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return cls._counts + cls._sums

    @classmethod
    def zeros(cls, device=None):
        return cls(**{n: _zero_i(device) for n in cls._counts}, **{n: _zero_f(device) for n in cls._sums})

    def __post_init__(self):
        for name in self._names():
            v = getattr(self, name)
            dtype = _I64 if name in self._counts else _F64
            if not isinstance(v, torch.Tensor):
                v = torch.tensor(v, dtype=dtype)
            elif v.dtype != dtype:
                v = v.to(dtype)
            if v.dim() != 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a scalar, got shape {tuple(v.shape)}")
            object.__setattr__(self, name, v)

    @property
    def device(self) -> torch.device:
        return getattr(self, self._counts[0]).device

    def to(self, device):
        return type(self)(**{n: getattr(self, n).to(device) for n in self._names()})

    def raw(self) -> dict:
        """The stored fields as Python numbers (synchronises)."""
        return {f.name: getattr(self, f.name).item() for f in dataclasses.fields(self)}

    @classmethod
    def from_raw(cls, d: dict, device=None):
        missing = [n for n in cls._names() if n not in d]
        if missing:
            raise ValueError(f"{cls.__name__}.from_raw: missing fields {missing}")
        for n in cls._counts:
            v = d[n]
            whole = isinstance(v, numbers.Integral) or isinstance(v, numbers.Real) and float(v).is_integer()
            if isinstance(v, bool) or not whole or v < 0:
                raise ValueError(f"{cls.__name__}.from_raw: count {n!r} must be a whole number >= 0, got {v!r}")
        return cls(**{n: torch.tensor(int(d[n]) if n in cls._counts else d[n], dtype=_I64 if n in cls._counts else _F64,
                                      device=device) for n in cls._names()})

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 vector of the counts, float64 vector of the sums), in ``_counts``/``_sums`` order."""
        ints = torch.stack([getattr(self, n) for n in self._counts])
        flts = torch.stack([getattr(self, n) for n in self._sums])
        return ints, flts

    @classmethod
    def _unpack(cls, ints: torch.Tensor, flts: torch.Tensor):
        kw = {n: ints[i] for i, n in enumerate(cls._counts)}
        kw.update({n: flts[i] for i, n in enumerate(cls._sums)})
        return cls(**kw)

    def all_reduce(self, group=None):
        """Merge this accumulator across all ranks of a ``torch.distributed`` group.

        Every rank's fields are gathered and merged in rank order, so every rank gets
        the same result, equal (to float64 rounding) to one process that saw all data.
        Returns a new accumulator; ``self`` is unchanged. Without an initialised process
        group it returns ``self``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        world = dist.get_world_size(group)
        ints, flts = self._pack()
        gi = [torch.empty_like(ints) for _ in range(world)]
        gf = [torch.empty_like(flts) for _ in range(world)]
        dist.all_gather(gi, ints, group=group)
        dist.all_gather(gf, flts, group=group)
        out = self._unpack(gi[0], gf[0])
        for r in range(1, world):
            out = out + self._unpack(gi[r], gf[r])
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Moments(_Accumulator):
    """Streaming statistics of one layer's hidden states ``h[b, t, d]``.

    Over valid (non-padding) positions and finite values:

    * ``samples``: sequences with at least two finite hidden units in their token mean.
    * ``pooled_var_sum`` = sum_b Var_d( mean_t h[b, t, d] ) (unbiased over d): the AVSS
      paper's variance once divided by ``samples``.
    * ``tokens``: valid tokens with at least two finite values;
      ``token_var_sum`` = sum_(b,t) Var_d h[b, t, :] (unbiased).
    * ``elements``, ``mean``, ``m2``: count, mean and sum of squared deviations of all
      valid finite values (global variance = m2 / (elements - 1)).
    * ``near_zero``: valid finite values with |h| below the sparsity threshold.
    * ``nonfinite``: NaN/Inf values at valid positions (excluded from everything else).
    """

    samples: torch.Tensor
    tokens: torch.Tensor
    elements: torch.Tensor
    pooled_var_sum: torch.Tensor
    token_var_sum: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    near_zero: torch.Tensor
    nonfinite: torch.Tensor

    _counts: ClassVar[tuple[str, ...]] = ("samples", "tokens", "elements", "near_zero", "nonfinite")
    _sums: ClassVar[tuple[str, ...]] = ("pooled_var_sum", "token_var_sum", "mean", "m2")

    def __add__(self, other: "Moments") -> "Moments":
        if not isinstance(other, Moments):
            return NotImplemented
        other = other.to(self.device) if other.device != self.device else other
        elements, mean, m2 = chan_merge(self.elements, self.mean, self.m2, other.elements, other.mean, other.m2)
        return Moments(
            samples=self.samples + other.samples,
            tokens=self.tokens + other.tokens,
            elements=elements,
            pooled_var_sum=self.pooled_var_sum + other.pooled_var_sum,
            token_var_sum=self.token_var_sum + other.token_var_sum,
            mean=mean,
            m2=m2,
            near_zero=self.near_zero + other.near_zero,
            nonfinite=self.nonfinite + other.nonfinite,
        )

    __radd__ = lambda self, other: self if other == 0 else self.__add__(other)  # noqa: E731  (sum())

    # Derived values (Python floats; synchronise).
    @property
    def pooled_variance(self) -> float:
        """Mean over samples of Var_d(token-mean hidden state): the AVSS variance."""
        s = int(self.samples)
        return float(self.pooled_var_sum) / s if s else math.nan

    @property
    def token_variance(self) -> float:
        t = int(self.tokens)
        return float(self.token_var_sum) / t if t else math.nan

    @property
    def variance(self) -> float:
        """Unbiased variance of all valid finite values."""
        n = int(self.elements)
        return float(self.m2) / (n - 1) if n > 1 else math.nan

    @property
    def sparsity(self) -> float:
        """Fraction of valid finite values with |h| below the threshold."""
        n = int(self.elements)
        return int(self.near_zero) / n if n else math.nan

    @property
    def avss(self) -> float:
        """AVSS with the project's guard: ``pooled_variance / max(sparsity, 1 / elements)``
        (a sparsity of 0 counts as one near-zero value); NaN without data."""
        n = int(self.elements)
        var = self.pooled_variance
        return var / max(self.sparsity, 1.0 / n) if n > 0 and math.isfinite(var) else math.nan


@dataclasses.dataclass(frozen=True, eq=False)
class Similarity(_Accumulator):
    """Streaming input/output similarity of one block over valid tokens.

    ``cos_sum`` = sum_t cos(h_in_t, h_out_t), ``angular_sum`` = sum_t arccos(cos)/pi,
    ``tokens`` = tokens counted, ``nonfinite`` = valid tokens skipped because either
    vector held a NaN/Inf. Block Influence (ShortGPT) = 1 - cos_sum / tokens.
    """

    tokens: torch.Tensor
    cos_sum: torch.Tensor
    angular_sum: torch.Tensor
    nonfinite: torch.Tensor

    _counts: ClassVar[tuple[str, ...]] = ("tokens", "nonfinite")
    _sums: ClassVar[tuple[str, ...]] = ("cos_sum", "angular_sum")

    def __add__(self, other: "Similarity") -> "Similarity":
        if not isinstance(other, Similarity):
            return NotImplemented
        other = other.to(self.device) if other.device != self.device else other
        return Similarity(
            tokens=self.tokens + other.tokens,
            cos_sum=self.cos_sum + other.cos_sum,
            angular_sum=self.angular_sum + other.angular_sum,
            nonfinite=self.nonfinite + other.nonfinite,
        )

    __radd__ = lambda self, other: self if other == 0 else self.__add__(other)  # noqa: E731

    @property
    def mean_cos(self) -> float:
        t = int(self.tokens)
        return float(self.cos_sum) / t if t else math.nan

    @property
    def block_influence(self) -> float:
        """ShortGPT Block Influence: 1 - mean cosine similarity of block input and output."""
        return 1.0 - self.mean_cos

    @property
    def angular_distance(self) -> float:
        """Mean arccos(cos)/pi, in [0, 1]."""
        t = int(self.tokens)
        return float(self.angular_sum) / t if t else math.nan
