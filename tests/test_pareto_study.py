"""The Pareto study's reading of its points (train_free_runs/pareto/pareto.py) against brute force."""
import itertools
import math
import random

from train_free_runs.pareto.pareto import best_at, dominance, frontier, level_table


def brute_front(points, higher):
    better = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
    strictly = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    return {p for p in points
            if not any((better(q[0], p[0]) and q[1] > p[1]) or (strictly(q[0], p[0]) and q[1] >= p[1]) for q in points)}


def test_frontier_is_the_undominated_points():
    rng = random.Random(0)
    for higher in (True, False):
        for _ in range(50):
            points = [(rng.choice([20.0, 25.0, 30.0, 35.0, math.inf]), rng.choice([1.0, 1.5, 2.0, 3.0]))
                      for _ in range(rng.randint(1, 9))]
            assert set(frontier(points, higher)) == brute_front(set(points), higher)


def test_best_at_level():
    points = [(41.0, 1.5), (36.0, 2.5), (34.9, 4.0), (math.inf, 1.0)]
    assert best_at(points, 35.0) == 2.5 and best_at(points, 30.0) == 4.0 and best_at(points, 40.0) == 1.5
    assert best_at([(20.0, 5.0)], 30.0) is None
    for level, speeds in itertools.product((30.0, 35.0), [points]):
        assert best_at(speeds, level) == max(s for q, s in speeds if q >= level)


def rows(*points):
    return [{"tool": tool, "setting": f"{tool} {i}", "flops_speedup": str(s), "psnr_db": str(q), "wall_speedup": ""}
            for i, (tool, q, s) in enumerate(points)]


def test_dominance_and_ratio():
    table = rows(("cachelab", 36.0, 3.0), ("cachelab", 31.0, 4.0), ("peer A", 35.5, 2.0), ("peer A", 30.0, 4.5),
                 ("peer B", 40.0, 1.2))
    lines = dominance(table)
    assert lines[0].startswith("1 of 3 peer points")  # full compute (1.00×) matches none of them
    assert any("peer A" in line and "4.50×" in line for line in lines) and any("peer B" in line for line in lines)
    ratio = level_table(table, "flops_speedup")[-1]
    assert ratio == "| cachelab / best peer | **0.89** | **1.50** | — |"  # 4.0/4.5, 3.0/2.0; nobody-ours at 40


def test_a_peer_point_that_skips_nothing_is_matched_by_full_compute():
    assert dominance(rows(("cachelab", 36.0, 3.0), ("peer", math.inf, 1.0)))[0].startswith("1 of 1 peer points")
