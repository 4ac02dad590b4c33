"""Stage 1, prompt expansion: who each identity is, and what expression each sample asks for, in words.

Per identity: demographic attributes drawn from the manifest's distributions, and an identity prompt used
to paint its reference face. Per sample: an expression (emotion prototype, random AU combination or
neutral) as FACS intensities over the build's AU set, and a MIFA-style description carrying `<ID> <ID2>`.
Each draw uses its own generator seeded by (seed, identity[, sample]).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from mifa_pipeline.aus import EMOTION_NOUNS, EMOTION_PROTOTYPES, INTENSITY_ADJECTIVES, describe_aus
from mifa_pipeline.config import PromptSection
from mifa_pipeline.records import IdentityRecord, SampleRecord, StageStats
from mifa_pipeline.seeding import derive_seed, rng

ID_PLACEHOLDER = "<ID> <ID2>"


def _weighted_choice(generator: np.random.Generator, weights: dict[str, float]) -> str:
    """Draw over *sorted* names so a manifest's key order never changes the result."""
    names = sorted(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    return names[int(generator.choice(len(names), p=p / p.sum()))]


def describe_person(demographics: dict[str, str]) -> str:
    """'a young adult East Asian woman with light skin, brown eyes and short black hair, wearing a blue top'."""
    known = ("age", "ethnicity", "gender", "skin", "eyes", "hair", "clothing")
    core = " ".join(demographics[k] for k in ("age", "ethnicity", "gender") if k in demographics) or "person"
    text = f"a {core}"
    features = [demographics[k] for k in ("skin", "eyes", "hair") if k in demographics]
    if features:
        text += " with " + (", ".join(features[:-1]) + " and " + features[-1] if len(features) > 1 else features[0])
    if "clothing" in demographics:
        text += f", wearing {demographics['clothing']}"
    extras = [v for k, v in sorted(demographics.items()) if k not in known]
    return ", ".join([text, *extras])


class PromptExpansion:
    name = "prompts"
    version = "1"

    def __init__(self, config: PromptSection, seed: int, samples_per_identity: int,
                 describe: Callable[[int], dict[str, str]] | None = None):
        """`describe(reference_seed)`, when given, replaces the drawn demographics: a generator that decides
        the look itself (the teacher) says in words what it will draw, so prompts match images."""
        self.config = config
        self.describe = describe
        self.seed = seed
        self.samples_per_identity = samples_per_identity
        self.random_pool = config.random_au_pool
        au_set = set(config.au_names)
        # Prototypes restricted to the build's AU set; an emotion with no AU left cannot be asked for.
        self.prototypes = {
            e: {au: v for au, v in EMOTION_PROTOTYPES[e].items() if au in au_set}
            for e, w in config.emotions.items()
            if w > 0
        }
        self.prototypes = {e: aus for e, aus in self.prototypes.items() if aus}
        mix = config.expression_mix
        self.mix = {"prototype": mix.prototype if self.prototypes else 0.0, "random": mix.random, "neutral": mix.neutral}
        if sum(self.mix.values()) <= 0:
            raise ValueError(f"prompts: no emotion prototype uses any AU of {config.au_names} and the other kinds have weight 0")

    # ------------------------------------------------------------------ per identity
    def identity(self, identity: int) -> IdentityRecord:
        reference_seed = derive_seed(self.seed, "reference", identity)
        if self.describe is not None:
            demographics = self.describe(reference_seed)
        else:
            g = rng(self.seed, "demographics", identity)
            demographics = {a: _weighted_choice(g, self.config.demographics[a]) for a in sorted(self.config.demographics)}
        prompt = (
            f"a close-up portrait photo of {describe_person(demographics)}, neutral expression, "
            "looking at the camera, soft studio lighting"
        )
        return IdentityRecord(identity=identity, seed=reference_seed,
                              demographics=demographics, prompt=prompt)

    # ------------------------------------------------------------------ per sample
    def expression(self, identity: int, sample: int) -> tuple[str, dict[str, int], str]:
        """(kind or emotion, AU intensities over the AU set, the words for it)."""
        g = rng(self.seed, "expression", identity, sample)
        kind = _weighted_choice(g, self.mix)
        intensities = {au: 0 for au in self.config.au_names}
        if kind == "neutral":
            return "neutral", intensities, "with a neutral, relaxed expression"
        if kind == "prototype":
            emotion = _weighted_choice(g, {e: self.config.emotions[e] for e in self.prototypes})
            strength = int(g.integers(1, 6))  # how marked the whole expression is, FACS A..E
            for au, typical in self.prototypes[emotion].items():
                intensities[au] = int(np.clip(round(typical * strength / 3), 1, 5))
            words = f"displaying a {INTENSITY_ADJECTIVES[strength]} {EMOTION_NOUNS[emotion]}, the face shows " + describe_aus(
                {au: v for au, v in intensities.items() if v}
            )
            return emotion, intensities, words
        r, pool = self.config.random_aus, self.random_pool
        k = int(g.integers(r.min_aus, min(r.max_aus, len(pool)) + 1))
        chosen = sorted(g.choice(len(pool), size=k, replace=False).tolist())
        for index in chosen:
            intensities[pool[index]] = int(g.integers(r.min_intensity, r.max_intensity + 1))
        return "random", intensities, "the face shows " + describe_aus({au: v for au, v in intensities.items() if v})

    def samples(self, person: IdentityRecord) -> list[SampleRecord]:
        out = []
        who = describe_person(person.demographics)
        for s in range(self.samples_per_identity):
            kind, intensities, words = self.expression(person.identity, s)
            out.append(SampleRecord(
                identity=person.identity, sample=s, seed=derive_seed(self.seed, "sample", person.identity, s),
                expression=kind, requested=intensities,
                prompt=f"a close-up portrait photo of {ID_PLACEHOLDER}, {who}, {words}",
            ))
        return out

    def run(self, identities: Iterable[int]) -> tuple[list[IdentityRecord], list[SampleRecord], StageStats]:
        start = time.perf_counter()
        people = [self.identity(i) for i in identities]
        samples = [s for p in people for s in self.samples(p)]
        stats = StageStats(self.name, self.version, n_in=len(samples), n_out=len(samples),
                           seconds=time.perf_counter() - start)
        return people, samples, stats
