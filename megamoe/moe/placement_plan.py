"""Expert placement planner (issue 14): which EP rank holds each logical expert of one MoE layer.

Pure functions on plain sequences (no process groups, no torch): the runtime measures loads, calls
``plan_placement`` and migrates what ``moves`` lists. A placement is ``rank_of[e]`` = EP rank of logical
expert e; every rank holds exactly E / EP experts (its slots), so the only way to change a placement
is to exchange experts between ranks. The slowest rank sets the step time, so the objective is the
maximum rank load, reported as max / mean (1.0 = perfect balance).

Two planners, measured side by side in bench/planner_quality.py:

- ``plan_placement`` (ours): two candidates, the better one wins, and ``current`` unless a candidate
  beats it. (1) Pairwise-swap local search from ``current`` (a nearly balanced layer changes little);
  (2) longest-processing-time packing with E / EP slots per rank, the same local search, then the
  packed groups are given to the ranks that already hold most of their experts. Both then undo moves
  that the achieved maximum does not need and pull cross-node moves inside a node.
- ``beam_search_placement``: ColossalAI-MoE's LoadBalancer search (colossalai/moe/load_balance.py), the
  baseline: beam search over pairwise swaps scored by the drop in |rank mean - mean| of the two ranks,
  with a penalty for swapping a rank or a slot again, stopping within ``tolerance`` of the mean.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Relative tolerance when comparing max/mean values: float sums of the same loads in another order
# differ in the last bits, and such noise must never look like a gain worth moving experts for.
_SCORE_TOLERANCE = 1e-9


# ---------------------------------------------------------------------------------------------------
# Validation and measures
# ---------------------------------------------------------------------------------------------------

def check_expert_count(num_experts: int, ep_size: int) -> None:
    """ValueError (one line) unless ``num_experts`` experts divide evenly over ``ep_size`` EP ranks."""
    if ep_size < 1:
        raise ValueError(f"EP size {ep_size} must be at least 1")
    if num_experts < 1 or num_experts % ep_size:
        raise ValueError(f"{num_experts} experts do not divide over {ep_size} EP ranks; choose an "
                         f"expert-model-parallel size that divides the expert count")


def check_placement(rank_of: Sequence[int], num_experts: int, ep_size: int) -> None:
    """Raise ValueError (one line: the problem and the fix) unless ``rank_of`` gives each of
    ``ep_size`` EP ranks exactly num_experts / ep_size of the ``num_experts`` experts."""
    check_expert_count(num_experts, ep_size)
    if len(rank_of) != num_experts:
        raise ValueError(f"placement has {len(rank_of)} entries for {num_experts} experts; give the EP "
                         f"rank of every logical expert")
    per_rank = num_experts // ep_size
    counts = [0] * ep_size
    for expert, rank in enumerate(rank_of):
        if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or not 0 <= rank < ep_size:
            raise ValueError(f"placement puts expert {expert} on EP rank {rank!r}, outside 0..{ep_size - 1}; "
                             f"give a placement made for EP size {ep_size}")
        counts[rank] += 1
    for rank, count in enumerate(counts):
        if count != per_rank:
            raise ValueError(f"placement gives EP rank {rank} {count} experts; every one of the {ep_size} "
                             f"EP ranks must hold exactly {per_rank} (E / EP)")


def check_loads(loads: Sequence[float]) -> list[float]:
    """The loads as floats; ValueError (one line) for an empty list or a negative or non-finite load."""
    if len(loads) == 0:
        raise ValueError("no expert loads given; give one load per logical expert")
    values = []
    for expert, load in enumerate(loads):
        if isinstance(load, bool) or not isinstance(load, int | float | np.integer | np.floating):
            raise ValueError(f"load of expert {expert} is {load!r}, not a number; give token counts")
        if not math.isfinite(load) or load < 0:
            raise ValueError(f"load of expert {expert} is {load}; loads must be finite and >= 0 "
                             f"(tokens routed to the expert)")
        values.append(float(load))
    return values


def check_ranks_per_node(ranks_per_node: int, ep_size: int) -> None:
    """ValueError unless nodes of ``ranks_per_node`` EP ranks tile the EP group (0: no node layout;
    a node at least as large as the EP group holds all of it)."""
    if ranks_per_node < 0 or (0 < ranks_per_node < ep_size and ep_size % ranks_per_node):
        raise ValueError(f"{ranks_per_node} EP ranks per node do not tile {ep_size} EP ranks; give a node "
                         f"size that divides the EP size (or 0 for no node preference)")


def rank_loads(loads: Sequence[float], rank_of: Sequence[int], ep_size: int) -> list[float]:
    """Load of each EP rank: the sum of its experts' loads."""
    if len(loads) != len(rank_of):
        raise ValueError(f"{len(loads)} loads for a placement of {len(rank_of)} experts; give one load "
                         f"per logical expert")
    totals = [0.0] * ep_size
    for load, rank in zip(loads, rank_of):
        totals[rank] += float(load)
    return totals


def max_over_mean(loads: Sequence[float], rank_of: Sequence[int], ep_size: int) -> float:
    """Maximum rank load / mean rank load; 1.0 when nothing was routed."""
    totals = rank_loads(loads, rank_of, ep_size)
    total = sum(totals)
    return 1.0 if total <= 0 else max(totals) * ep_size / total


def lower_bound(loads: Sequence[float], ep_size: int) -> float:
    """The issue's bound on max / mean for any placement: max(1, max expert load / mean rank load)."""
    total = float(sum(loads))
    return 1.0 if total <= 0 else max(1.0, max(loads) * ep_size / total)


def slot_lower_bound(loads: Sequence[float], ep_size: int) -> float:
    """A tighter bound on max / mean that knows every rank holds E / EP experts: some rank holds m of
    the (m-1)*EP + 1 largest experts (pigeonhole), so its load is at least the m smallest of those plus
    the E/EP - m smallest experts overall; the best m gives the bound. m = 1 is the hottest expert and
    the E/EP - 1 coldest. With two experts per rank it is the optimum: pairing the k-th hottest with
    the k-th coldest minimises the largest pair (exchange argument). Never below ``lower_bound``."""
    total = float(sum(loads))
    if total <= 0:
        return 1.0
    descending = sorted((float(load) for load in loads), reverse=True)
    per_rank = len(descending) // ep_size
    # suffix[i] = sum of descending[i:], the coldest experts from position i on
    suffix = [0.0] * (len(descending) + 1)
    for i in range(len(descending) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + descending[i]
    best = total / ep_size
    for together in range(1, per_rank + 1):
        top_count = (together - 1) * ep_size + 1
        forced = sum(descending[top_count - together:top_count])
        coldest = suffix[len(descending) - (per_rank - together)]
        best = max(best, forced + coldest)
    if per_rank == 2:
        best = max(best, max(descending[k] + descending[-1 - k] for k in range(ep_size)))
    return max(1.0, best * ep_size / total)


def moves(current: Sequence[int], new: Sequence[int]) -> list[dict]:
    """[{"expert": e, "from": old rank, "to": new rank}] for every expert whose EP rank changes."""
    if len(current) != len(new):
        raise ValueError(f"placements of {len(current)} and {len(new)} experts cannot be compared; give "
                         f"two placements of the same layer")
    return [{"expert": expert, "from": int(old), "to": int(rank)}
            for expert, (old, rank) in enumerate(zip(current, new)) if old != rank]


def _checked_problem(loads: Sequence[float], current: Sequence[int], ep_size: int) -> list[float]:
    values = check_loads(loads)
    if len(current) != len(values):
        raise ValueError(f"current placement has {len(current)} entries for {len(values)} expert loads; "
                         f"give the current EP rank of every expert")
    check_placement(current, len(values), ep_size)
    return values


# ---------------------------------------------------------------------------------------------------
# Ours: swap local search from the current placement and from LPT packing, then fewer moves
# ---------------------------------------------------------------------------------------------------

@dataclass
class _Layout:
    """Loads and the home (current) placement of one layer as arrays, plus the node of every rank."""

    loads: np.ndarray          # [E] float64
    home: np.ndarray           # [E] int64, current EP rank
    node_of_rank: np.ndarray   # [EP] int64; all 0 without a node layout
    ep_size: int
    per_rank: int
    mean: float                # mean rank load
    tolerance: float           # absolute load difference treated as equal


@dataclass
class _Plan:
    members: np.ndarray  # [EP, E/EP] expert ids held by each rank
    max_load: float
    moves: int
    cross_node_moves: int


def plan_placement(loads: Sequence[float], current: Sequence[int], ep_size: int,
                   ranks_per_node: int = 0, move_cost: float = 0.0) -> list[int]:
    """New EP rank of each expert: the smallest maximum rank load found, then the fewest moves, then
    the fewest moves between nodes. ``loads[e]``: load of expert e (tokens routed to it);
    ``current[e]``: its EP rank now; ``ranks_per_node``: EP ranks per node (r, r' share a node iff
    r // ranks_per_node == r' // ranks_per_node; 0: one node); ``move_cost``: the max / mean a moved
    expert must buy (0: any gain is worth any number of moves). Returns ``list(current)`` when no
    placement beats it."""
    values = _checked_problem(loads, current, ep_size)
    check_ranks_per_node(ranks_per_node, ep_size)
    if not math.isfinite(move_cost) or move_cost < 0:
        raise ValueError(f"move cost {move_cost} must be finite and >= 0 (max / mean per moved expert)")
    unchanged = [int(rank) for rank in current]
    total = sum(values)
    if ep_size == 1 or total <= 0:
        return unchanged
    layout = _make_layout(values, unchanged, ep_size, ranks_per_node)
    start = _plan_of(layout, _members_of(layout.home, ep_size))
    # A placement already at a lower bound is optimal: nothing to search.
    if start.max_load <= slot_lower_bound(values, ep_size) * layout.mean + layout.tolerance:
        return unchanged
    best = start
    for candidate in (_improve_current(layout, start.members, move_cost),
                      _pack_and_improve(layout)):
        if _is_better(layout, candidate, best, move_cost):
            best = candidate
    if best is start:
        return unchanged
    return _ranks_of(best.members, len(values)).tolist()


def _make_layout(values: list[float], home: list[int], ep_size: int, ranks_per_node: int) -> _Layout:
    loads = np.asarray(values, dtype=np.float64)
    spans_nodes = 0 < ranks_per_node < ep_size
    node_of_rank = np.arange(ep_size) // ranks_per_node if spans_nodes else np.zeros(ep_size, np.int64)
    mean = float(loads.sum()) / ep_size
    return _Layout(loads=loads, home=np.asarray(home, dtype=np.int64), node_of_rank=node_of_rank,
                   ep_size=ep_size, per_rank=len(values) // ep_size, mean=mean,
                   tolerance=_SCORE_TOLERANCE * mean)


def _members_of(rank_of: np.ndarray, ep_size: int) -> np.ndarray:
    """[EP, E/EP] expert ids per rank, in expert order (the slot order of ExpertPlacement.from_ranks)."""
    return np.argsort(rank_of, kind="stable").reshape(ep_size, -1)


def _ranks_of(members: np.ndarray, num_experts: int) -> np.ndarray:
    rank_of = np.empty(num_experts, dtype=np.int64)
    rank_of[members] = np.arange(members.shape[0])[:, None]
    return rank_of


def _plan_of(layout: _Layout, members: np.ndarray) -> _Plan:
    rank_of = _ranks_of(members, len(layout.loads))
    moved = rank_of != layout.home
    cross = moved & (layout.node_of_rank[rank_of] != layout.node_of_rank[layout.home])
    max_load = float(layout.loads[members].sum(axis=1).max())
    return _Plan(members=members, max_load=max_load, moves=int(moved.sum()),
                 cross_node_moves=int(cross.sum()))


def _score(layout: _Layout, plan: _Plan, move_cost: float) -> float:
    return plan.max_load / layout.mean + move_cost * plan.moves


def _is_better(layout: _Layout, plan: _Plan, other: _Plan, move_cost: float) -> bool:
    """Lower score (max / mean + move cost), then fewer moves, then fewer cross-node moves."""
    score, other_score = _score(layout, plan, move_cost), _score(layout, other, move_cost)
    if abs(score - other_score) > _SCORE_TOLERANCE:
        return score < other_score
    return (plan.moves, plan.cross_node_moves) < (other.moves, other.cross_node_moves)


def _improve_current(layout: _Layout, members: np.ndarray, move_cost: float) -> _Plan:
    """Swap search from the current placement; with a move cost, the best prefix of the swap sequence
    (a long chain of swaps can pay where its first swap alone does not, so no swap is refused)."""
    members = members.copy()
    swaps = _balance_by_swaps(layout, members, prefer_home=True)
    if move_cost > 0 and swaps:
        members = _best_prefix(layout, _members_of(layout.home, layout.ep_size), swaps, move_cost)
    return _fewer_moves(layout, members)


def _pack_and_improve(layout: _Layout) -> _Plan:
    members = _pack_longest_first(layout)
    _balance_by_swaps(layout, members, prefer_home=False)
    members = members[_match_groups_to_ranks(layout, members)]
    return _fewer_moves(layout, members)


def _pack_longest_first(layout: _Layout) -> np.ndarray:
    """LPT with slots: experts by decreasing load, each to the least loaded rank with a free slot."""
    members = np.empty((layout.ep_size, layout.per_rank), dtype=np.int64)
    filled = [0] * layout.ep_size
    open_ranks = [(0.0, rank) for rank in range(layout.ep_size)]  # (load, rank) heap of ranks with room
    for expert in np.argsort(-layout.loads, kind="stable"):
        load, rank = heapq.heappop(open_ranks)
        members[rank, filled[rank]] = expert
        filled[rank] += 1
        if filled[rank] < layout.per_rank:
            heapq.heappush(open_ranks, (load + float(layout.loads[expert]), rank))
    return members


def _balance_by_swaps(layout: _Layout, members: np.ndarray, prefer_home: bool) -> list[tuple]:
    """Steepest-descent swaps on the most loaded rank, in place; returns the swaps made as
    (rank, slot, rank, slot). Each swap moves load d from the top rank to a rank r with 0 < d < gap(r),
    which lowers the sum of squared rank loads, so the search ends; among the swaps that leave the pair
    with the lowest maximum it takes the fewest moves (``prefer_home``), then the fewest cross-node."""
    weights = layout.loads[members]
    rank_load = weights.sum(axis=1)
    swaps: list[tuple] = []
    for _ in range(4 * len(layout.loads)):
        swap = _best_swap(layout, members, weights, rank_load, prefer_home)
        if swap is None:
            break
        _apply_swap(members, weights, rank_load, swap)
        swaps.append(swap)
    return swaps


def _best_swap(layout: _Layout, members: np.ndarray, weights: np.ndarray, rank_load: np.ndarray,
               prefer_home: bool) -> tuple | None:
    top = int(np.argmax(rank_load))
    gap = rank_load[top] - rank_load
    # shift[a, r, b]: load moved off the top rank by swapping its slot a with slot b of rank r
    shift = weights[top][:, None, None] - weights[None, :, :]
    valid = (shift > layout.tolerance) & (shift < gap[None, :, None] - layout.tolerance)
    if not valid.any():
        return None
    pair_max = np.maximum(rank_load[top] - shift, rank_load[None, :, None] + shift)
    pair_max = np.where(valid, pair_max, np.inf)
    near = np.flatnonzero(pair_max <= pair_max.min() + layout.tolerance)
    slot_a, rank_b, slot_b = np.unravel_index(near, shift.shape)
    if prefer_home and len(near) > 1:
        tie_break = _swap_cost(layout, members[top, slot_a], top, members[rank_b, slot_b], rank_b)
        choice = int(np.argmin(tie_break))
    else:
        choice = 0
    return top, int(slot_a[choice]), int(rank_b[choice]), int(slot_b[choice])


def _swap_cost(layout: _Layout, expert_a: np.ndarray, rank_a: np.ndarray | int, expert_b: np.ndarray,
               rank_b: np.ndarray | int) -> np.ndarray:
    """Change in (moves, cross-node moves) when expert_a (on rank_a) and expert_b (on rank_b) trade
    places, as one integer moves * 8 + cross (cross-node changes by at most 2 per swap)."""
    home_a, home_b = layout.home[expert_a], layout.home[expert_b]
    node = layout.node_of_rank
    moved = ((home_a != rank_b).astype(np.int64) - (home_a != rank_a)
             + (home_b != rank_a) - (home_b != rank_b))
    cross = ((node[home_a] != node[rank_b]).astype(np.int64) - (node[home_a] != node[rank_a])
             + (node[home_b] != node[rank_a]) - (node[home_b] != node[rank_b]))
    return moved * 8 + cross


def _apply_swap(members: np.ndarray, weights: np.ndarray, rank_load: np.ndarray, swap: tuple) -> None:
    rank_a, slot_a, rank_b, slot_b = swap
    shift = weights[rank_a, slot_a] - weights[rank_b, slot_b]
    members[rank_a, slot_a], members[rank_b, slot_b] = members[rank_b, slot_b], members[rank_a, slot_a]
    weights[rank_a, slot_a], weights[rank_b, slot_b] = weights[rank_b, slot_b], weights[rank_a, slot_a]
    rank_load[rank_a] -= shift
    rank_load[rank_b] += shift


def _best_prefix(layout: _Layout, members: np.ndarray, swaps: list[tuple], move_cost: float) -> np.ndarray:
    """The placement after the first k swaps, for the k with the lowest max / mean + move cost."""
    weights = layout.loads[members]
    rank_load = weights.sum(axis=1)
    best_plan = _plan_of(layout, members.copy())
    for swap in swaps:
        _apply_swap(members, weights, rank_load, swap)
        plan = _plan_of(layout, members.copy())
        if _is_better(layout, plan, best_plan, move_cost):
            best_plan = plan
    return best_plan.members


def _match_groups_to_ranks(layout: _Layout, members: np.ndarray) -> np.ndarray:
    """order[r] = which packed group rank r gets, so that most experts stay on their rank (then in
    their node): greedy matching by overlap, improved by exchanging the ranks of two groups while that
    keeps more experts in place."""
    ep_size = layout.ep_size
    homes = layout.home[members]                          # [group, slot]
    overlap = np.zeros((ep_size, ep_size), dtype=np.int64)  # overlap[g, r]: experts of g homed on r
    np.add.at(overlap, (np.repeat(np.arange(ep_size), layout.per_rank), homes.ravel()), 1)
    node = layout.node_of_rank
    same_node = np.zeros((ep_size, ep_size), dtype=np.int64)  # experts of g homed on r's node
    for group in range(ep_size):
        same_node[group] = (node[homes[group]][:, None] == node[None, :]).sum(axis=0)
    value = overlap * (2 * layout.per_rank + 1) + same_node  # staying on the rank outweighs the node
    rank_of_group = _greedy_assignment(value)
    _exchange_while_better(value, rank_of_group)
    order = np.empty(ep_size, dtype=np.int64)
    order[rank_of_group] = np.arange(ep_size)
    return order


def _greedy_assignment(value: np.ndarray) -> np.ndarray:
    size = value.shape[0]
    rank_of_group = np.full(size, -1, dtype=np.int64)
    taken = np.zeros(size, dtype=bool)
    for flat in np.argsort(-value, axis=None, kind="stable"):
        group, rank = divmod(int(flat), size)
        if rank_of_group[group] < 0 and not taken[rank]:
            rank_of_group[group] = rank
            taken[rank] = True
    return rank_of_group


def _exchange_while_better(value: np.ndarray, rank_of_group: np.ndarray) -> None:
    """2-opt on the assignment: give two groups each other's rank while the total value rises."""
    groups = np.arange(value.shape[0])
    for _ in range(4):
        improved = False
        for group in groups:
            mine = rank_of_group[group]
            gain = (value[group, rank_of_group] + value[groups, mine]
                    - value[group, mine] - value[groups, rank_of_group])
            other = int(np.argmax(gain))
            if gain[other] > 0:
                rank_of_group[group], rank_of_group[other] = rank_of_group[other], mine
                improved = True
        if not improved:
            return


def _fewer_moves(layout: _Layout, members: np.ndarray) -> _Plan:
    """Swaps that keep every rank at or under the plan's maximum load and cut (moves, cross-node
    moves): a moved expert goes home (or to its home node) and trades places with one of the experts
    there, which is best one that was itself moved away from the first expert's rank."""
    limit = float(layout.loads[members].sum(axis=1).max()) + layout.tolerance
    rank_load = layout.loads[members].sum(axis=1)
    rank_of = _ranks_of(members, len(layout.loads))
    slot_of = np.empty(len(layout.loads), dtype=np.int64)
    slot_of[members] = np.arange(layout.per_rank)[None, :]
    node = layout.node_of_rank
    for _ in range(4):
        improved = False
        for expert in np.flatnonzero(rank_of != layout.home):
            rank = int(rank_of[expert])
            home = int(layout.home[expert])
            targets = np.flatnonzero(node == node[home])  # its home node: [home] without nodes
            partners = members[targets].ravel()
            partner_ranks = np.repeat(targets, layout.per_rank)
            load, partner_loads = layout.loads[expert], layout.loads[partners]
            fits = ((rank_load[rank] - load + partner_loads <= limit)
                    & (rank_load[partner_ranks] - partner_loads + load <= limit))
            change = _swap_cost(layout, np.full(len(partners), expert), rank, partners, partner_ranks)
            change = np.where(fits & (partner_ranks != rank), change, 0)
            pick = int(np.argmin(change))
            if change[pick] >= 0:
                continue
            partner, target = int(partners[pick]), int(partner_ranks[pick])
            swap = (rank, int(slot_of[expert]), target, int(slot_of[partner]))
            _swap_positions(members, rank_of, slot_of, swap)
            shift = load - layout.loads[partner]
            rank_load[rank] -= shift
            rank_load[target] += shift
            improved = True
        if not improved:
            break
    return _plan_of(layout, members)


def _swap_positions(members: np.ndarray, rank_of: np.ndarray, slot_of: np.ndarray, swap: tuple) -> None:
    rank_a, slot_a, rank_b, slot_b = swap
    expert_a, expert_b = members[rank_a, slot_a], members[rank_b, slot_b]
    members[rank_a, slot_a], members[rank_b, slot_b] = expert_b, expert_a
    rank_of[expert_a], rank_of[expert_b] = rank_b, rank_a
    slot_of[expert_a], slot_of[expert_b] = slot_b, slot_a


# ---------------------------------------------------------------------------------------------------
# Baseline: ColossalAI-MoE's beam search over pairwise swaps
# ---------------------------------------------------------------------------------------------------

# ColossalAI's penalty for swapping a slot index that an earlier swap of the same rank touched.
_REPEAT_SLOT_PENALTY = 1e5
# ColossalAI keeps swaps whose gain is > 0 on sums recomputed from the swapped lists; the gain here comes
# from shifted means, where a swap that changes nothing (one expert per rank) can show ~1e-16 of
# rounding. Loads are normalised to [0, 1], so an absolute floor separates rounding from real gains.
_MIN_GAIN = 1e-12


@dataclass
class _BeamState:
    data: np.ndarray      # [EP, E/EP] normalised loads in slot order
    score: float
    swaps: list[tuple]    # (rank i, slot a, rank j, slot b), i < j
    penalty: np.ndarray   # [EP, E/EP] swap loss a further swap of (rank, slot) would pay


def beam_search_placement(loads: Sequence[float], current: Sequence[int], ep_size: int,
                          beam_width: int = 8, max_swaps: int | None = None, tolerance: float = 0.1,
                          group_swap_factor: float = 0.4) -> list[int]:
    """ColossalAI-MoE's LoadBalancer._search_balance (defaults: beam 8, tolerance 0.1, group swap
    factor 0.4). Loads are normalised by the largest; a swap of slot a of rank i with slot b of rank j
    (i < j) is kept if it lowers |mean_i - avg| + |mean_j - avg|, and scores that drop minus a swap
    loss per earlier swap touching rank i or j (``group_swap_factor``; 1e5 if it also touches the same
    slot index). Each beam state keeps its ``beam_width`` best swaps, the pooled results their
    ``beam_width`` best; the search stops when nothing improves, the best score stays equal, every
    rank mean is within ``tolerance`` of the mean, or after ``max_swaps`` swaps (default E)."""
    values = _checked_problem(loads, current, ep_size)
    if beam_width < 1:
        raise ValueError(f"beam width {beam_width} must be at least 1")
    unchanged = [int(rank) for rank in current]
    largest = max(values)
    if ep_size == 1 or largest <= 0:
        return unchanged
    slots = _members_of(np.asarray(unchanged), ep_size)
    data = np.asarray(values)[slots] / largest
    average = float(data.mean())
    beam = [_BeamState(data, 0.0, [], np.zeros_like(data))]
    for _ in range(len(values) if max_swaps is None else max_swaps):
        pooled = [state for parent in beam
                  for state in _expand(parent, beam_width, average, group_swap_factor)]
        if not pooled:
            break
        pooled.sort(key=lambda state: -state.score)  # stable: ties keep enumeration order
        if pooled[0].score == beam[0].score:
            break
        beam = pooled[:beam_width]
        rank_means = beam[0].data.mean(axis=1)
        if np.all(np.abs(rank_means - average) <= tolerance * average):
            break
    for rank_i, slot_a, rank_j, slot_b in beam[0].swaps:
        slots[rank_i, slot_a], slots[rank_j, slot_b] = slots[rank_j, slot_b], slots[rank_i, slot_a]
    return _ranks_of(slots, len(values)).tolist()


def _expand(state: _BeamState, beam_width: int, average: float, group_swap_factor: float) -> list[_BeamState]:
    """The ``beam_width`` best improving swaps from ``state``, best first."""
    ep_size, per_rank = state.data.shape
    means = state.data.mean(axis=1)
    deviation = np.abs(means - average)
    # shift[i, a, j, b] = data[i, a] - data[j, b]: rank i's sum drops by it, rank j's rises by it
    shift = (state.data[:, :, None, None] - state.data[None, None, :, :]) / per_rank
    new_deviation = (np.abs(means[:, None, None, None] - shift - average)
                     + np.abs(means[None, None, :, None] + shift - average))
    gain = deviation[:, None, None, None] + deviation[None, None, :, None] - new_deviation
    ordered_pair = (np.arange(ep_size)[:, None] < np.arange(ep_size)[None, :])[:, None, :, None]
    candidates = np.flatnonzero((gain > _MIN_GAIN) & ordered_pair)
    if len(candidates) == 0:
        return []
    penalty = state.penalty[:, :, None, None] + state.penalty[None, None, :, :]
    scores = (state.score + gain - penalty).ravel()[candidates]
    best = candidates[np.argsort(-scores, kind="stable")[:beam_width]]
    return [_child(state, tuple(int(i) for i in np.unravel_index(flat, gain.shape)),
                   float(state.score + gain.flat[flat] - penalty.flat[flat]), group_swap_factor)
            for flat in best]


def _child(state: _BeamState, swap: tuple, score: float, group_swap_factor: float) -> _BeamState:
    rank_i, slot_a, rank_j, slot_b = swap
    data = state.data.copy()
    data[rank_i, slot_a], data[rank_j, slot_b] = data[rank_j, slot_b], data[rank_i, slot_a]
    penalty = state.penalty.copy()
    for rank in (rank_i, rank_j):
        penalty[rank] += group_swap_factor
        # ColossalAI compares the slot index with both slots of the earlier swap, whatever the rank
        for slot in {slot_a, slot_b}:
            penalty[rank, slot] += _REPEAT_SLOT_PENALTY - group_swap_factor
    return _BeamState(data, score, state.swaps + [swap], penalty)


def read_layer_lists(path: str, what: str) -> list:
    """The rebalancer's per-layer file format: a JSON list with one list per MoE layer (per-expert
    loads, or EP ranks of a placement). ValueError (one line) if it cannot be read or is not one."""
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not JSON ({error}); write it with json.dump") from None
    if not isinstance(value, list) or not all(isinstance(entry, list) for entry in value) or not value:
        raise ValueError(f"{what} {path} must be a non-empty list with one list per MoE layer; wrap a "
                         f"single layer in [...]")
    return value
