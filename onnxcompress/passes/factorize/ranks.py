"""Rank choice: per layer from an energy or ratio criterion, or across layers for a MAC budget (greedy
on each layer's lower convex hull of MACs against loss)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

import numpy as np

from .candidates import Candidate
from .layers import Layer


def _criterion_rank(cand: Candidate, energy: float | None, ratio: float | None) -> int:
    rank = 1
    if energy is not None:
        cum = np.cumsum(cand.sigma**2)
        rank = max(rank, int(np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12))) + 1) if cum[-1] > 0 else rank
    if ratio is not None:
        rank = max(rank, math.ceil(ratio * cand.full_rank - 1e-9))
    return rank


def eligible_ranks(cands: list[Candidate], energy: float | None, ratio: float | None, round_to: int
              ) -> tuple[list[tuple[Candidate, int]], str]:
    """The (form, rank) pairs whose criterion rank, rounded up to `round_to`, stays below break-even,
    fewest MACs first; or none and why."""
    eligible, reasons = [], []
    for cand in cands:
        rank = _criterion_rank(cand, energy, ratio)
        rounded = math.ceil(rank / round_to) * round_to
        if rounded >= cand.break_even:
            reasons.append(f"{cand.form} rank {rank} (rounded to {rounded}) >= break-even {cand.break_even:.1f}")
        else:
            eligible.append((cand, rounded))
    eligible.sort(key=lambda pick: pick[1] * pick[0].per_rank)
    return eligible, ("no saving: " + "; ".join(reasons)) if not eligible else ""


def allocate_budget(layers: list[Layer], candidates: Mapping[str, list[Candidate]], round_to: int,
                     budget: float, total: int) -> tuple[dict[str, tuple[Candidate, int]], bool]:
    """Greedy on each layer's lower convex hull of (MACs, loss): the step with the least loss per
    MAC saved first, until the model's MACs fit the budget."""
    hulls: dict[str, list[tuple[int, float, Candidate | None, int]]] = {}
    for layer in layers:
        points = [(layer.macs, 0.0, None, 0)]
        for cand in candidates[layer.node.name]:
            for rank in range(round_to, math.ceil(cand.break_even), round_to):
                if rank < cand.break_even:
                    points.append((rank * cand.per_rank, cand.loss(rank), cand, rank))
        hulls[layer.node.name] = _lower_hull(points)
    heap: list[tuple[float, int, str, int]] = []
    for i, (name, hull) in enumerate(hulls.items()):
        if len(hull) > 1:
            heapq.heappush(heap, (_slope(hull[0], hull[1]), i, name, 1))
    chosen: dict[str, tuple[Candidate, int]] = {}
    current = float(total)
    while heap and current > budget:
        _, i, name, step = heapq.heappop(heap)
        hull = hulls[name]
        current -= hull[step - 1][0] - hull[step][0]
        chosen[name] = (hull[step][2], hull[step][3])
        if step + 1 < len(hull):
            heapq.heappush(heap, (_slope(hull[step], hull[step + 1]), i, name, step + 1))
    return chosen, current <= budget


def _slope(a, b) -> float:
    return (b[1] - a[1]) / max(a[0] - b[0], 1)


def _lower_hull(points):
    """From the unfactorized point (most MACs, no loss) toward fewer MACs, the convex chain of least loss."""
    hull: list = []
    for p in sorted(points, key=lambda p: (-p[0], p[1])):
        if hull and p[0] == hull[-1][0]:
            continue  # same MACs, more loss
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], p):
            hull.pop()
        hull.append(p)
    return hull
