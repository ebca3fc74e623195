"""Float32 error budgets for the suite's float comparisons (PyTorch vs ONNX Runtime, batched vs alone, fast
path vs plain formula, float32 vs a float64 reference).

A limit is what the computation can lose in float32, not what one machine happened to lose: other CPUs run
other kernels (oneDNN/MKL/MLAS blocking and summation order, FMA or not, AVX-512 / AVX2 / no vectorisation),
and several-fold differences in the realised error are normal. The rules used (u = 2**-24, float32 unit
roundoff):

* a dot product of length n: |fl(a.b) - a.b| <= n u sum_i |a_i b_i| whatever the summation order, blocking or
  FMA (Higham, gamma_n); so errors are relative to the magnitude of the operands, not of the result, where
  the sum cancels. Typical (random-sign roundings): ~sqrt(n) u sum_i |a_i b_i|.
* a chain of layers at unit-scale activations (calibrate_frozen_bn; gain ~1 per layer): the layers' terms add.
* two float32 implementations compared with each other: both sides err, twice the one-sided budget.
* sin/cos of a float32 argument t computed in k roundings: the argument is off by ~k u |t| (the embedding's
  100 * log(...) angles reach several hundred radians).

A bug this suite must still catch (wrong head order, a missing bias, a +1 px box convention) moves results
by ~1e-1 relative or ~1 px: every limit stays well below that.
"""

from __future__ import annotations

import math

#: float32 unit roundoff (round to nearest); machine epsilon is 2 * U.
U = 2.0**-24

#: Reductions (lengths of the dot products) along the main path of the synthetic presets' small ResNet-C4
#: (synthetic_single: stem 16, blocks (1, 1, 2, 1)): stem 7x7x3, then per bottleneck 1x1, 3x3, 1x1 of res2..res4.
SMALL_BACKBONE = (147, 16, 144, 16, 64, 288, 32, 128, 576, 64, 256, 576, 64)
#: The box head after RoIAlign: res5 (1x1 256, 3x3 128, 1x1 128), channel reduction 512 -> 64, fc6 (64 x 7 x 7),
#: fc7 (256).
SMALL_BOX_HEAD = (256, 1152, 128, 512, 3136, 256)


def relation_stage(feat_dim: int = 256, num_heads: int = 8, refs: int = 200) -> tuple[int, ...]:
    """Reductions of one relation module on the query path: Wq/Wk (feat_dim), the head's q.k (feat_dim /
    num_heads), the attention-weighted sum over ``refs`` references (weights sum to 1: relative to the
    largest value), Wv (feat_dim)."""
    return (feat_dim, feat_dim // num_heads, refs, feat_dim)


def dot_budget(n: int, magnitude: float = 1.0, depth: int = 1, margin: float = 1.0) -> float:
    """Worst-case absolute float32 error of ``depth`` chained dot products of length ``n`` whose operands'
    sum_i |a_i b_i| is at most ``magnitude``: margin * depth * n * u * magnitude."""
    return margin * depth * n * U * magnitude


def chain_budget(lengths, magnitude: float = 1.0, sides: int = 1, margin: float = 1.0) -> float:
    """Worst-case float32 error of a chain of reductions of the given lengths (the layers' terms add), at
    operand magnitude ``magnitude``, for ``sides`` float32 computations compared with each other (2: both
    err), times ``margin``."""
    return margin * sides * sum(lengths) * U * magnitude


def typical_chain(lengths, magnitude: float = 1.0, sides: int = 1, margin: float = 1.0) -> float:
    """Typical (random-sign roundings) float32 error of the same chain: the layers' variances add,
    sqrt(sum n) u per side, sqrt(sides) for independent sides, times ``margin`` (which must cover the
    largest of many elements, ~4-5 sigma, and other kernels)."""
    return margin * math.sqrt(sides * sum(lengths)) * U * magnitude


def angle_budget(max_angle: float, roundings: int = 3) -> float:
    """Absolute error of sin/cos of a float32 argument |t| <= max_angle formed in ``roundings`` roundings
    (e.g. log, x 100, / wave_length^(k/F)), plus the function's own ulp: roundings * u * max_angle + 2u."""
    return roundings * U * max_angle + 2 * U
