"""The secure-aggregation limits, each written once: what fits in 32 bits, the smallest safe cohort and
threshold, the clip range and maximum weight nodes accept by default, and the one node-weight rule.

A leaf module (standard library and :mod:`fedtune.common.errors` only): the job configuration checks a
job against these limits, the node's rules (:class:`~fedtune.common.secagg.protocol.NodeRules`) default to
them and the protocol enforces them, without the configuration importing the protocol's cryptography.
"""

from __future__ import annotations

from fedtune.common.errors import SecAggError

MOD_BITS = 32  # updates are summed in Z_(2^32)
MIN_LEVELS = 16  # fewer quantization levels than this per clip unit would drown the update in rounding
MIN_COHORT = 3  # with 2 nodes each would learn the other's update from the sum
MIN_THRESHOLD = 2  # the smallest Shamir threshold a node accepts
MIN_ORGANIZATIONS = 3  # distinct approved organizations a cohort must hold, by default
MAX_WEIGHT = 10**6  # the largest per-node weight a node accepts, by default
CLIP_RANGE = (1e-3, 1e3)  # the clip a node accepts, by default
WEIGHTINGS = ("weighted", "uniform")  # FedAvg weights: a node's records (rounded up to whole batches), or 1


def node_weight(weight: int, mode: str) -> float:
    """A node's FedAvg weight: what it reported (its records rounded up to whole batches) or 1 ("uniform")."""
    if mode == "uniform":
        return 1.0
    if mode == "weighted":
        return float(weight)
    raise ValueError(f"unknown aggregation {mode!r}")


def effective_max_weight(weighting: str, max_weight: int) -> int:
    """The largest weight a round really uses: 1 with uniform weighting (every node weighs 1), else ``max_weight``."""
    return 1 if weighting == "uniform" else max_weight


def max_weight_fitting(n_nodes: int) -> int:
    """The largest per-node weight whose sum over ``n_nodes`` still leaves MIN_LEVELS levels in 32 bits."""
    return (2 ** (MOD_BITS - 1) - 1) // (max(1, int(n_nodes)) * MIN_LEVELS)


def levels(*, n_nodes: int, max_weight: int) -> int:
    """Integer levels per unit clip range so that a sum of n weighted values cannot wrap around 2^32.

    Raises:
        SecAggError: when n x max-weight leaves fewer than MIN_LEVELS levels (the sum could wrap, or the
            update would drown in rounding).
    """
    n_nodes, max_weight = max(1, int(n_nodes)), max(1, int(max_weight))
    L = (2 ** (MOD_BITS - 1) - 1) // (n_nodes * max_weight)
    if L < MIN_LEVELS:
        raise SecAggError(
            f"secure aggregation cannot quantize for {n_nodes} nodes with fed.secagg-max-weight={max_weight}: "
            f"only {L} levels per clip unit fit in 32 bits (at least {MIN_LEVELS} are needed, or sums wrap around)",
            f"lower fed.secagg-max-weight to at most {max_weight_fitting(n_nodes):,}, or use "
            "fed.aggregation=uniform")
    return L
