"""Evolutionary width search of MetaPruning, with MetaPruning's and Rewarded meta-pruning's fitness.

Every candidate must lie in a hard MAC window around the target speed-up ``s``: its speed-up
``base_macs / macs`` is in ``[s, s * (1 + tolerance)]``. The first generation is ``population`` random
candidates from the window; each later one is ``population // 2`` mutants (every gene of a parent drawn
from the ``parents`` best candidates is redrawn with probability ``mutation_prob``), ``population // 2``
uniform crossovers of two parents, and random candidates where those run out. Candidates are never scored
twice (the scores are cached) and each generation's state is written atomically to a JSON file, so an
interrupted search continues where it stopped and ends exactly as an uninterrupted one would.

Fitness (a registry, ``method.fitness``):

* ``accuracy`` (MetaPruning): the validation accuracy of the candidate.
* ``reward`` (Rewarded meta-pruning): ``(A_base / (A_base - A))^2 * ln(F_base / F)`` with the accuracy
  ``A`` clamped to at most ``A_base - eps``, ``F`` the MACs; it trades accuracy for fewer MACs.
"""
from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nn.metapruning.pruningnet import Choice, WidthSpace
from utils.checkpoint import CheckpointError
from utils.io import atomic_write_json, read_json
from utils.pruning.progressive import PruningError
from utils.registry import Registry

log = logging.getLogger(__name__)

Fitness = Callable[[float, int], float]  # (accuracy %, MACs) -> fitness, higher is better
FITNESS: Registry[Callable[..., Fitness]] = Registry("search fitness")


@FITNESS.register("accuracy")
def accuracy_fitness(base_acc: float, base_macs: int, eps: float = 0.0) -> Fitness:
    """MetaPruning: the candidate's validation accuracy (the MAC window alone enforces the budget)."""
    return lambda acc, macs: float(acc)


@FITNESS.register("reward")
def reward_fitness(base_acc: float, base_macs: int, eps: float = 0.5) -> Fitness:
    """Rewarded meta-pruning: ``(A_base / (A_base - A))^2 * ln(F_base / F)``, ``A <= A_base - eps``."""
    def reward(acc: float, macs: int) -> float:
        a = min(float(acc), base_acc - eps)  # at or above the base the accuracy term would blow up
        return (base_acc / (base_acc - a)) ** 2 * math.log(base_macs / macs)
    return reward


@dataclass
class SearchSettings:
    """``method.search`` of the config."""

    population: int = 20
    generations: int = 8
    parents: int = 10
    mutation_prob: float = 0.1
    tolerance: float = 0.1
    max_tries: int = 20000

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> SearchSettings:
        known = {k: type(v)(cfg[k]) for k, v in vars(cls()).items() if k in cfg}
        return cls(**known)


@dataclass
class SearchResult:
    best: Choice
    record: dict[str, Any]  # acc, loss, macs, speed_up, fitness of the best candidate
    evaluations: int
    history: list[dict[str, Any]] = field(default_factory=list)


def key(choice: Sequence[int]) -> str:
    return ",".join(str(int(k)) for k in choice)


def unkey(text: str) -> Choice:
    return tuple(int(k) for k in text.split(","))


class Window:
    """The hard MAC window ``target <= base_macs / macs <= target * (1 + tolerance)``."""

    def __init__(self, space: WidthSpace, macs: Callable[[Choice], int], base_macs: int, target: float,
                 tolerance: float) -> None:
        self.space, self.macs, self.base_macs = space, macs, base_macs
        self.low, self.high = target, target * (1 + tolerance)
        reachable = base_macs / macs(space.narrowest())
        if target > reachable or target < 1.0:
            raise PruningError(f"a {target:g}x speed-up is unreachable with these width choices (from 1x to "
                               f"{reachable:.2f}x); choose index= in that range or lower method.ratios.min")

    def speed_up(self, choice: Choice) -> float:
        return self.base_macs / self.macs(choice)

    def __contains__(self, choice: Choice) -> bool:
        return self.low <= self.speed_up(choice) <= self.high

    def random(self, rng: random.Random, max_tries: int, exclude: Mapping[str, Any] | set = ()) -> Choice | None:
        """A uniformly random candidate inside the window (rejection sampling), or None after ``max_tries``."""
        for _ in range(max_tries):
            c = self.space.sample(rng)
            if key(c) not in exclude and c in self:
                return c
        return None


def random_search(window: Window, score: Callable[[Choice], dict[str, float]], fitness: Fitness, n: int,
                  seed: int, max_tries: int = 20000) -> SearchResult:
    """Best of ``n`` distinct random candidates from the window (the baseline the evolution must beat)."""
    rng, seen = random.Random(seed), {}
    while len(seen) < n:
        c = window.random(rng, max_tries, seen)
        if c is None:
            break
        seen[key(c)] = _record(c, score(c), window, fitness)
    best = max(seen, key=lambda k: (seen[k]["fitness"], k))
    return SearchResult(unkey(best), seen[best], len(seen))


def _record(choice: Choice, scores: Mapping[str, float], window: Window, fitness: Fitness) -> dict[str, Any]:
    macs = window.macs(choice)
    return {**scores, "macs": macs, "speed_up": window.base_macs / macs, "fitness": fitness(scores["acc"], macs)}


class EvolutionarySearch:
    """MetaPruning's evolutionary search over a :class:`Window`; see the module docstring.

    Args:
        score: choice -> ``{"acc": %, "loss": ...}`` (BN recalibration and validation; deterministic).
        fitness: (acc, macs) -> fitness.
        state_path: the per-generation JSON state (None: no checkpointing).
        fingerprint: JSON-like settings that a resumed state must match.
    """

    def __init__(self, window: Window, score: Callable[[Choice], dict[str, float]], fitness: Fitness,
                 settings: SearchSettings, seed: int, state_path: Path | None = None,
                 fingerprint: Mapping[str, Any] | None = None, resume: bool = True, progress: bool = False) -> None:
        self.window, self.score, self.fitness, self.s = window, score, fitness, settings
        self.seed, self.state_path, self.resume, self.progress = seed, state_path, resume, progress
        self.fingerprint = json.loads(json.dumps(dict(fingerprint or {})))  # as it reads back from the file
        self.cache: dict[str, dict[str, Any]] = {}

    def _rng(self, generation: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + generation)  # per generation: resuming draws the same

    def _evaluate(self, choice: Choice) -> dict[str, Any]:
        k = key(choice)
        if k not in self.cache:
            self.cache[k] = _record(choice, self.score(choice), self.window, self.fitness)
        return self.cache[k]

    def _children(self, rng: random.Random, parents: list[Choice]) -> list[Choice]:
        s, space, out, taken = self.s, self.window.space, [], set(self.cache)

        def accept(c: Choice) -> bool:
            if key(c) in taken or c not in self.window:
                return False
            taken.add(key(c))
            out.append(c)
            return True

        for make, count in ((self._mutate, s.population // 2), (self._cross, s.population - s.population // 2)):
            made, tries = 0, 0
            while made < count and tries < 10 * count + 100:
                tries += 1
                made += accept(make(rng, parents, space))
        while len(out) < s.population:  # operators ran dry (tiny window): top up with random candidates
            c = self.window.random(rng, s.max_tries, taken)
            if c is None:
                break
            accept(c)
        return out

    def _mutate(self, rng: random.Random, parents: list[Choice], space: WidthSpace) -> Choice:
        p = rng.choice(parents)
        return tuple(rng.randrange(space.num_choices) if rng.random() < self.s.mutation_prob else g for g in p)

    def _cross(self, rng: random.Random, parents: list[Choice], space: WidthSpace) -> Choice:
        a, b = rng.choice(parents), rng.choice(parents)
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

    def _load(self) -> dict[str, Any] | None:
        if not (self.resume and self.state_path is not None and self.state_path.exists()):
            return None
        state = read_json(self.state_path)
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{self.state_path} belongs to a search with other settings; re-run with them, "
                                  "or pass resume=false (or another run_name=...) to start over")
        return state

    def run(self) -> SearchResult:
        state = self._load() or {"generation": 0, "parents": [], "cache": {}, "history": []}
        self.cache = dict(state["cache"])
        parents, history = [unkey(k) for k in state["parents"]], list(state["history"])
        if state["generation"]:
            log.info("search resumed after generation %d/%d (%d candidates scored)", state["generation"],
                     self.s.generations, len(self.cache))
        bar = tqdm(range(state["generation"], self.s.generations), desc="search", disable=not self.progress)
        for gen in bar:
            rng = self._rng(gen)
            if gen == 0:
                children = []
                while len(children) < self.s.population:
                    c = self.window.random(rng, self.s.max_tries, set(map(key, children)))
                    if c is None:
                        break
                    children.append(c)
                if not children:
                    raise PruningError(
                        f"no width vector found with a speed-up in [{self.window.low:g}, {self.window.high:g}] after "
                        f"{self.s.max_tries} random draws; widen method.search.tolerance or choose another index=")
            else:
                children = self._children(rng, parents)
            for c in children:
                self._evaluate(c)
            pool = {key(c) for c in children} | {key(p) for p in parents}
            ranked = sorted(pool, key=lambda k: (-self.cache[k]["fitness"], k))
            parents = [unkey(k) for k in ranked[: self.s.parents]]
            best = self.cache[ranked[0]]
            history.append({"generation": gen + 1, "scored": len(self.cache), "best_fitness": best["fitness"],
                            "best_acc": best["acc"], "best_speed_up": best["speed_up"]})
            bar.set_postfix(fitness=f"{best['fitness']:.3f}", acc=f"{best['acc']:.1f}")
            log.info("search generation %d/%d: best fitness %.4f (val acc %.2f, %.3fx), %d candidates scored",
                     gen + 1, self.s.generations, best["fitness"], best["acc"], best["speed_up"], len(self.cache))
            if self.state_path is not None:
                atomic_write_json({"fingerprint": self.fingerprint, "generation": gen + 1, "parents": ranked[: self.s.parents],
                                   "cache": self.cache, "history": history}, self.state_path)
        if not parents:
            raise PruningError("the search ran no generation (method.search.generations must be >= 1)")
        return SearchResult(parents[0], self.cache[key(parents[0])], len(self.cache), history)
