"""Float32 math shared by the Triton kernels of the losses and divergence families.

exp(x) - 1 and exp(x) - 1 - x without the cancellation near x = 0, written out (range reduction and a
polynomial) rather than through tl.exp: on the GPU tl.exp is the approximate ex2 instruction, whose absolute
error near exp(x) = 1 becomes a large relative error of exp(x) - 1. The same reduction and series as
csrc/cpu/vec_exp.h and csrc/losses_common.h.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2_HI = tl.constexpr(0.693359375)  # ln 2 = LN2_HI + LN2_LO; n * LN2_HI is exact for the n used here
LN2_LO = tl.constexpr(-2.12194440e-4)
SERIES_BOUND = tl.constexpr(0.25)  # exp_minus_linear: the series below |x| = 0.25, expm1(x) - x above


@triton.jit
def exp_tail(x):
    """(exp(x) - 1 - x) / x² by its Taylor series through x⁸/8!: within 1e-8 relative for |x| <= ln2/2."""
    p = 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    return p * x + 0.5


@triton.jit
def expm1(x):
    """exp(x) - 1 to about 1 ulp for any float32 x: x = n ln2 + r with |r| <= ln2/2, then
    2 (h (r + r² tail(r)) + (h - 1/2)) with h = 2^(n-1) built from its exponent bits. Halving keeps h a normal
    float up to n = 128 (x near 88.72, where the result reaches the float32 range) and the rounding is that of
    2^n expm1(r) + (2^n - 1); the final doubling overflows to inf exactly when the result does."""
    xc = tl.where(x < -87.0, -87.0, tl.where(x > 89.0, 89.0, x))  # keeps a nan (which then gives nan)
    n = tl.floor(xc * LOG2E + 0.5)
    r = (xc - n * LN2_HI) - n * LN2_LO
    q = r + r * r * exp_tail(r)
    half_scale = ((n.to(tl.int32) + 126) << 23).to(tl.float32, bitcast=True)
    return 2.0 * (half_scale * q + (half_scale - 0.5))


@triton.jit
def exp_minus_linear(x, expm1_x):
    """exp(x) - x - 1 (the k3 / low_var_kl estimator) to about 1e-6 relative, given expm1_x = expm1(x):
    x² tail(x) below |x| = 0.25, expm1(x) - x above (where the subtraction loses at most a factor 8)."""
    return tl.where(tl.abs(x) < SERIES_BOUND, x * x * exp_tail(x), expm1_x - x)
