"""Evolutionary search: beats random search, stays in the MAC window, caches, resumes exactly; the reward."""
import math

import pytest
import torch

from nn.metapruning.families import adapter_for
from nn.metapruning.pruningnet import MacTable, PruningNet
from nn.metapruning.search import (
    FITNESS,
    EvolutionarySearch,
    SearchSettings,
    Window,
    key,
    random_search,
    reward_fitness,
)
from utils.pruning.progressive import PruningError


@pytest.fixture(scope="module")
def space_and_macs():
    net = PruningNet(adapter_for("resnet20"), 10, [0.25 + 0.0625 * i for i in range(13)], hidden=1)
    table = MacTable(net, "resnet20", torch.zeros(1, 3, 16, 16))
    return net.space, table


class Landscape:
    """A deterministic stand-in for the PruningNet's accuracy: best at a hidden width vector, counts calls."""

    def __init__(self, space, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.opt = torch.randint(0, space.num_choices, (space.num_genes,), generator=g).tolist()
        self.weight = (torch.rand(space.num_genes, generator=g) + 0.5).tolist()
        self.calls = []

    def __call__(self, choice):
        self.calls.append(key(choice))
        acc = 100.0 - sum(w * abs(c - o) for w, c, o in zip(self.weight, choice, self.opt))
        return {"acc": acc, "loss": 1.0 / acc}


def _window(space_and_macs, target=2.0, tolerance=0.1):
    space, table = space_and_macs
    return Window(space, table, table(space.full()), target, tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_beats_as_many_random_valid_candidates(space_and_macs, seed):
    window = _window(space_and_macs)
    settings = SearchSettings(population=12, generations=6, parents=4)
    fitness = FITNESS.get("accuracy")(90.0, window.base_macs)
    landscape = Landscape(window.space, seed)
    evolved = EvolutionarySearch(window, landscape, fitness, settings, seed=seed).run()
    rand = random_search(window, Landscape(window.space, seed), fitness, evolved.evaluations, seed=seed)
    assert rand.evaluations == evolved.evaluations == len(landscape.calls) == len(set(landscape.calls))  # cached
    assert evolved.record["fitness"] > rand.record["fitness"]
    assert evolved.history[-1]["best_fitness"] >= evolved.history[0]["best_fitness"]
    assert 2.0 <= evolved.record["speed_up"] <= 2.2 and evolved.best in window


def test_every_scored_candidate_lies_in_the_window(space_and_macs, tmp_path):
    window = _window(space_and_macs, target=3.0, tolerance=0.05)
    landscape = Landscape(window.space)
    EvolutionarySearch(window, landscape, FITNESS.get("accuracy")(90.0, window.base_macs),
                       SearchSettings(population=8, generations=3, parents=3), seed=0).run()
    speed_ups = [window.speed_up(tuple(int(k) for k in c.split(","))) for c in landscape.calls]
    assert len(speed_ups) == 24 and all(3.0 <= s <= 3.15 for s in speed_ups)


@pytest.mark.slow
def test_an_interrupted_search_resumes_to_the_same_result_without_rescoring(space_and_macs, tmp_path):
    window = _window(space_and_macs)
    settings = SearchSettings(population=10, generations=5, parents=4)
    fitness = FITNESS.get("accuracy")(90.0, window.base_macs)
    reference = EvolutionarySearch(window, Landscape(window.space), fitness, settings, seed=3).run()

    class Interrupted(Landscape):
        def __call__(self, choice):
            if len(self.calls) == 27:  # in the third generation
                raise KeyboardInterrupt
            return super().__call__(choice)

    path, fp = tmp_path / "search.json", {"target": 2.0}
    with pytest.raises(KeyboardInterrupt):
        EvolutionarySearch(window, Interrupted(window.space), fitness, settings, seed=3, state_path=path, fingerprint=fp).run()
    again = Landscape(window.space)
    resumed = EvolutionarySearch(window, again, fitness, settings, seed=3, state_path=path, fingerprint=fp).run()
    assert resumed.best == reference.best and resumed.history == reference.history
    assert len(again.calls) == reference.evaluations - 20  # the two finished generations were not rescored
    from utils.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="other settings"):
        EvolutionarySearch(window, again, fitness, settings, seed=3, state_path=path, fingerprint={"target": 3.0}).run()


def test_unreachable_or_empty_windows_fail_clearly(space_and_macs):
    space, table = space_and_macs
    with pytest.raises(PruningError, match="unreachable.*from 1x to"):
        Window(space, table, table(space.full()), 50.0, 0.1)
    window = Window(space, table, table(space.full()), 1.0, 1e-9)  # only the full network itself qualifies...
    settings = SearchSettings(population=4, generations=1, max_tries=50)
    with pytest.raises(PruningError, match="no width vector found.*widen method.search.tolerance"):
        EvolutionarySearch(window, Landscape(space), FITNESS.get("accuracy")(90.0, 1), settings, seed=0).run()


def test_reward_ranks_a_cheaper_candidate_of_equal_accuracy_higher():
    reward = reward_fitness(base_acc=90.0, base_macs=1000, eps=0.5)
    assert reward(85.0, 400) > reward(85.0, 500) > 0
    assert reward(85.0, 500) == pytest.approx((90 / 5) ** 2 * math.log(2))
    # above the base the accuracy is clamped to A_base - eps: then only the MACs decide
    assert reward(95.0, 500) == reward(89.5, 500) == pytest.approx(180 ** 2 * math.log(2))
    assert reward(86.0, 500) > reward(85.0, 500)  # more accurate at the same MACs is better
    assert FITNESS.get("accuracy")(90.0, 1000)(85.0, 400) == 85.0
