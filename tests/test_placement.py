"""The expert placement planner (moela/placement.py) and `moela plan-experts` (moela/placement_cli.py)."""

import json
import random

import pytest

from moela.cli import main
from moela.errors import ConfigError
from moela.placement import Placement, imbalance, pack, plan_placement, replicate
from moela.server.metrics import ServerMetrics


def skewed(n_layers: int = 3, n_experts: int = 64, seed: int = 0) -> dict[int, list[int]]:
    """Heavy-tailed routed load, as real traffic has: a few experts take most tokens."""
    rng = random.Random(seed)
    return {layer: [int(100 * rng.paretovariate(1.1)) for _ in range(n_experts)] for layer in range(1, n_layers + 1)}


def test_replicate_and_pack_by_hand():
    load = [10, 1, 1, 1, 1, 1, 1, 4]
    counts = replicate(load, 10)  # 10 -> 5 per copy, then 5 > 4: a third copy
    assert counts == [3, 1, 1, 1, 1, 1, 1, 1]
    ranks = pack(load, counts, 2)  # heaviest first, each to the lighter rank: 7 (4), 0 (3.33), 0 (3.33, the rank
    assert ranks == [[0, 2, 4, 6, 7], [0, 0, 1, 3, 5]]  # without one), 0 (both hold it: the lighter), then the ones
    plan = Placement(8, 2, {1: ranks})
    assert plan.rank_loads(1, load) == pytest.approx([4 + 10 / 3 + 3, 2 * 10 / 3 + 3])


def test_planner_balances_a_skewed_load():
    load = skewed()
    plan = plan_placement(load, 64, 8, 8)
    in_order = Placement.contiguous(64, 8, list(load))
    for layer, counts in load.items():
        slots = plan.slots[layer]
        assert [len(r) for r in slots] == [9] * 8 and sorted({e for r in slots for e in r}) == list(range(64))
        before, after = imbalance(in_order.rank_loads(layer, counts)), imbalance(plan.rank_loads(layer, counts))
        assert before > 1.5 and after < 1.1 and after < before
        hottest = max(range(64), key=counts.__getitem__)
        assert len(plan.copies(layer)[hottest]) >= 2
        assert sum(plan.rank_loads(layer, counts)) == pytest.approx(sum(counts))
    no_copies = plan_placement(load, 64, 8, 0)
    assert all(imbalance(no_copies.rank_loads(layer, c)) <= imbalance(in_order.rank_loads(layer, c)) for layer, c in load.items())


def test_plan_files_round_trip_and_bad_ones_are_named(tmp_path):
    plan = plan_placement(skewed(2, 8), 8, 2, 2)
    plan.save(tmp_path / "plan.json")
    assert Placement.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text(json.dumps({"n_experts": 8, "n_ranks": 2, "layers": {"1": [[0, 1, 2], [3, 4, 5]]}}))
    with pytest.raises(ConfigError, match="bad.json: layer 1 must give 2 equal slot lists that hold every expert 0..7"):
        Placement.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="junk.json: not an expert placement plan"):
        Placement.load(tmp_path / "junk.json")
    with pytest.raises(ConfigError, match="do not fill 3 ranks equally"):
        plan_placement(skewed(1, 8), 8, 3, 0)
    with pytest.raises(ConfigError, match="the plan is for 8 experts on 2 ranks; this run has 8 experts on 4"):
        plan.check(8, [1, 2], 4, "plan.json")


def test_cli_reads_metrics_and_json_and_writes_a_plan(tmp_path, capsys):
    load = skewed(2, 16)
    metrics = ServerMetrics(lambda: {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "num_preemptions": 0,
                                     "prompt_tokens": 0, "generation_tokens": 0, "prefix_cache_queries": 0,
                                     "prefix_cache_hits": 0, "expert_load": load})
    (tmp_path / "metrics.txt").write_bytes(metrics.render())
    (tmp_path / "load.json").write_text(json.dumps(load))
    outputs = []
    for source in ("metrics.txt", "load.json"):
        assert main(["plan-experts", str(tmp_path / source), "--ranks", "4", "--redundant", "4", "--json",
                     "--out", str(tmp_path / "plan.json")]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    r = outputs[0]
    assert r["redundant"] == 4 and r["after"] < r["before"]
    plan = Placement.load(tmp_path / "plan.json")
    assert r["layers"]["1"]["after"] == pytest.approx(imbalance(plan.rank_loads(1, load[1])))
    assert main(["plan-experts", str(tmp_path / "load.json"), "--ranks", "4", "--model", "deepseek-v3",
                 "--hardware", "h800"]) == 0
    text = capsys.readouterr().out
    assert "in order  planned" in text and "cost model, after planning: tensor parallel step" in text


def test_cli_records_the_load_by_running_the_model(text_model, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("def fibonacci(n):\nfor i in range(10):\n")
    assert main(["plan-experts", "--record", str(text_model), "--prompts", str(tmp_path / "prompts.txt"),
                 "--max-tokens", "4", "--ranks", "2", "--save-load", str(tmp_path / "load.json")]) == 0
    load = json.loads((tmp_path / "load.json").read_text())
    assert sorted(load) == ["1", "2"] and all(len(v) == 8 and sum(v) > 0 for v in load.values())
    assert "max/mean routed load per rank, 2 ranks, 0 redundant copies" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "empty.json").write_text("{}")
    assert main(["plan-experts", str(tmp_path / "empty.json"), "--ranks", "2"]) == 1
    assert "no expert load in it" in capsys.readouterr().err
    (tmp_path / "load.json").write_text(json.dumps(skewed(1, 8)))
    assert main(["plan-experts", str(tmp_path / "load.json"), "--ranks", "3"]) == 1
    assert "do not fill 3 ranks equally" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan-experts", "--ranks", "2"])
