"""The adoption gate's rule: which of two models a site serves, the federation's or its own.

A site that also trains a model on its own images alone (`edge-agent train`) can serve whichever of the
two retrieves better on a labelled validation set of its own that neither model trained on: the agent
applies this rule to every deployment (`edge.deployment`, ``[adoption]`` in edge.toml) and the learning
study to its runs (`bench/federated.py --gate-from`). One rule for both, so that the study measures what
sites do.
"""

from __future__ import annotations


def prefer_own(own: dict[str, float], federation: dict[str, float]) -> bool:
    """True when the site's own model scores strictly higher on the validation set: rank-1 first, then mAP
    (`reid.evaluate.Metrics.summary` dicts, in percent). Ties keep the federation's model, and so does a
    validation set without a valid query (no ``rank1`` in either summary: nothing to decide on)."""
    if "rank1" not in own or "rank1" not in federation:
        return False
    return (own["rank1"], own["mAP"]) > (federation["rank1"], federation["mAP"])
