"""What the verl and OpenRLHF adapter tests share: inputs (rounded to the test dtype, masks with holes, fresh
leaves) and the comparison of our result with the peer's own code in the test dtype and in float64."""

from __future__ import annotations

import torch

# Each result is computed three ways: the peer's original in the test dtype ("peer"), the peer's original in
# float64 (the reference) and the patched function in the test dtype ("ours").
RUNS = (("peer", None), ("ref", torch.float64), ("ours", None))


def assert_matches(ours, peer, reference, *, rtol=2e-5, atol=2e-6):
    """fp32: ours == the peer's within float32 rounding. Low precision: ours no further from the float64
    reference (the peer's own code run in float64) than the peer's result in that dtype is (k = 2)."""
    # One rounding of a result in the peer's dtype: the least "own error" (a scalar can round luckily).
    resolution = torch.finfo(peer.dtype).eps if peer.is_floating_point() else 0.0
    ours, peer, reference = (t.detach().double() for t in (ours, peer, reference))
    assert ours.shape == peer.shape
    assert torch.equal(ours.isnan(), reference.isnan())  # NaN exactly where the peer's code gives NaN
    ours, peer, reference = (t.nan_to_num() for t in (ours, peer, reference))
    scale = reference.abs().max().clamp(min=1e-30).item()
    own_error = (peer - reference).abs().max()
    if own_error <= rtol * scale:  # float32 peer
        torch.testing.assert_close(ours, peer, rtol=rtol, atol=atol * scale, equal_nan=True)
    else:
        assert (ours - reference).abs().max() <= 2 * max(own_error, resolution * scale) + atol * scale


def mask_with_holes(rows, steps, dtype=torch.long):
    """Random 0/1 mask with holes, a left-padded row, a right-padded row and a fully masked row."""
    mask = torch.rand(rows, steps) > 0.3
    mask[0, : steps // 3] = False
    mask[1, steps // 2 :] = False
    mask[2] = False
    return mask.to(dtype)


def rounded(dtype, *tensors):
    """The inputs rounded to the test dtype, so that the float64 reference sees the same values."""
    return [t.to(dtype).float() for t in tensors]


def leaf(x, dtype):
    return x.detach().to(dtype, copy=True).requires_grad_()
