"""Where each routed expert lives under expert parallelism, and a planner that balances measured load in the
manner of DeepSeek's EPLB: redundant copies of the hottest experts, then a balanced packing of every copy
onto the ranks.

    load = llm.engine.expert_load()                  # {MoE layer: tokens routed to each expert}
    plan = plan_placement(load, n_experts=256, n_ranks=8, n_redundant=8)
    plan.save("placement.json")
    LLM(model=..., tensor_parallel_size=8, enable_expert_parallel=True, expert_placement="placement.json")

A placement gives, per MoE layer and rank, the logical expert held in each of the rank's slots; every
rank has the same number of slots. Without a plan the experts are split in order (rank r holds experts
r*E/N .. (r+1)*E/N - 1). An expert held twice serves half of its (token, expert) pairs from each copy
(the copy is chosen by token index), so a copy's expected load is its expert's load over its copies.
`moela plan-experts` (moela/placement_cli.py) runs the planner on recorded traffic.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from moela.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    n_experts: int
    n_ranks: int
    slots: dict[int, list[list[int]]]  # MoE layer -> per rank, the logical expert in each slot

    @classmethod
    def contiguous(cls, n_experts: int, n_ranks: int, layers: list[int] = ()) -> "Placement":
        if n_experts % n_ranks:
            raise ConfigError(f"n_routed_experts = {n_experts} does not split evenly over {n_ranks} expert-parallel "
                              "ranks: use a placement plan (moela plan-experts) or another rank count")
        per = n_experts // n_ranks
        return cls(n_experts, n_ranks, {layer: [list(range(r * per, (r + 1) * per)) for r in range(n_ranks)]
                                        for layer in layers})

    def rank_slots(self, layer: int, rank: int) -> list[int]:
        """The logical expert of each slot of `rank` in `layer` (the in-order split for a layer the plan lacks)."""
        if layer in self.slots:
            return self.slots[layer][rank]
        per = self.n_experts // self.n_ranks
        return list(range(rank * per, (rank + 1) * per))

    def copies(self, layer: int) -> list[list[tuple[int, int]]]:
        """Per logical expert, the (rank, slot) of each copy."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.n_experts)]
        for rank in range(self.n_ranks):
            for slot, expert in enumerate(self.rank_slots(layer, rank)):
                out[expert].append((rank, slot))
        return out

    def rank_loads(self, layer: int, load: list[float]) -> list[float]:
        """Expected tokens each rank's experts serve in `layer` under this placement."""
        copies = self.copies(layer)
        return [sum(load[e] / len(copies[e]) for e in self.rank_slots(layer, r)) for r in range(self.n_ranks)]

    def save(self, path: str | Path) -> None:
        body = {"n_experts": self.n_experts, "n_ranks": self.n_ranks,
                "layers": {str(layer): ranks for layer, ranks in sorted(self.slots.items())}}
        Path(path).write_text(json.dumps(body) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        """Read and check a plan: whole slot lists of equal length, every expert held at least once per layer."""
        try:
            body = json.loads(Path(path).read_text(encoding="utf-8"))
            n_experts, n_ranks = int(body["n_experts"]), int(body["n_ranks"])
            slots = {int(layer): [[int(e) for e in rank] for rank in ranks] for layer, ranks in body["layers"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}: not an expert placement plan ({e})") from None
        for layer, ranks in slots.items():
            held = sorted({e for rank in ranks for e in rank})
            if len(ranks) != n_ranks or len({len(r) for r in ranks}) != 1 or held != list(range(n_experts)):
                raise ConfigError(f"{path}: layer {layer} must give {n_ranks} equal slot lists that hold every "
                                  f"expert 0..{n_experts - 1} at least once")
        return cls(n_experts, n_ranks, slots)

    def check(self, n_experts: int, moe_layers: list[int], n_ranks: int, where: str) -> None:
        """The plan fits this model and this many expert-parallel ranks."""
        if self.n_experts != n_experts or self.n_ranks != n_ranks:
            raise ConfigError(f"{where}: the plan is for {self.n_experts} experts on {self.n_ranks} ranks; this run "
                              f"has {n_experts} experts on {n_ranks} expert-parallel ranks")
        extra = sorted(set(self.slots) - set(moe_layers))
        if extra:
            raise ConfigError(f"{where}: the plan places layer {extra[0]}, which is not an MoE layer of this model")


def replicate(load: list[float], n_copies: int) -> list[int]:
    """Copies per expert: each extra copy goes to the expert whose copies carry the most load each."""
    counts = [1] * len(load)
    for _ in range(n_copies - len(load)):
        hottest = max(range(len(load)), key=lambda e: load[e] / counts[e])
        counts[hottest] += 1
    return counts


def pack(load: list[float], counts: list[int], n_ranks: int) -> list[list[int]]:
    """Every copy onto a rank, heaviest first, each to the least-loaded rank with a free slot that does not
    hold that expert yet (longest-processing-time greedy with equal slot counts)."""
    per_rank = sum(counts) // n_ranks
    items = sorted(((load[e] / c, e) for e, c in enumerate(counts) for _ in range(c)), key=lambda item: (-item[0], item[1]))
    ranks: list[list[int]] = [[] for _ in range(n_ranks)]
    totals = [0.0] * n_ranks
    for share, expert in items:
        free = [r for r in range(n_ranks) if len(ranks[r]) < per_rank]
        fresh = [r for r in free if expert not in ranks[r]] or free
        best = min(fresh, key=lambda r: (totals[r], r))
        ranks[best].append(expert)
        totals[best] += share
    return [sorted(r) for r in ranks]


def plan_placement(load: dict[int, list[float]], n_experts: int, n_ranks: int, n_redundant: int = 0) -> Placement:
    """A placement of every MoE layer's experts plus `n_redundant` extra copies onto `n_ranks` ranks."""
    if n_redundant < 0 or n_ranks < 1:
        raise ConfigError(f"ranks must be >= 1 and redundant copies >= 0 (got {n_ranks} and {n_redundant})")
    if (n_experts + n_redundant) % n_ranks:
        raise ConfigError(f"{n_experts} experts + {n_redundant} redundant copies do not fill {n_ranks} ranks "
                          f"equally: make the sum a multiple of {n_ranks}")
    slots = {}
    for layer, counts in load.items():
        if len(counts) != n_experts:
            raise ConfigError(f"layer {layer} has loads for {len(counts)} experts, expected {n_experts}")
        slots[layer] = pack(counts, replicate(counts, n_experts + n_redundant), n_ranks)
    return Placement(n_experts, n_ranks, slots)


def imbalance(rank_loads: list[float]) -> float:
    """max / mean load over ranks: 1.0 is perfect balance, and the slowest rank's extra time factor."""
    mean = sum(rank_loads) / len(rank_loads)
    return max(rank_loads) / mean if mean else 1.0
