"""Run other trainers unchanged on rlhf_fast's kernels.

    from rlhf_fast.integrations import trl as rf_trl
    rf_trl.patch()          # or: with rf_trl.patch(): ...

One module per peer (`trl`, ...), each with `patch()` and `unpatch()`. A patched function keeps the peer's
semantics and signature; an input our kernels do not handle goes to the peer's original. Importing this
package imports no peer: each adapter imports its peer when it is used.
"""
