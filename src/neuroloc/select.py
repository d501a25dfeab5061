"""Which of the kmax neurons form the union (the k of Algorithm 1, step 6)."""

from __future__ import annotations

import torch

from neuroloc.config import LocalizeConfig


def choose_neurons(
    dam_scores: torch.Tensor, region_scores: torch.Tensor | None, blobs: torch.Tensor, config: LocalizeConfig
) -> torch.Tensor:
    """Bool (kmax,) of the neurons whose blobs are united.

    The k best by region score (or by DAM score when re-scoring is off), never an empty blob.
    """
    ranking = region_scores if region_scores is not None else dam_scores
    usable = blobs.flatten(1).any(dim=1) & torch.isfinite(dam_scores)
    ranking = torch.where(usable, ranking.to(torch.float64), torch.tensor(float("-inf"), dtype=torch.float64))
    order = torch.argsort(ranking, descending=True, stable=True)
    kept = torch.zeros_like(usable)
    chosen = order[: config.k]
    kept[chosen] = usable[chosen]
    return kept
