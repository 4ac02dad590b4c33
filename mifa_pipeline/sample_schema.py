"""The published sample schema: what each `KEY.json` member (and its flattened sidecar row) holds, typed once.

Every field has one type in every sample of every build, and nothing is null: HF `datasets` infers one Arrow
schema from the first samples, torch's `default_collate` refuses None, Ray Data and pyarrow want one type per
column. A score a judge did not compute (judge switched off, no face found, no proxy for an AU, the first
identity's nearest earlier one) is 0 with its `<score>_valid` flag false; every numeric score has that flag.
The scores' key set depends only on the data set's AU order, never on which judges ran.

The internal scores (`scores/` tables, what `mifa filter` re-decides from) keep their raw form with nulls;
`public_scores` turns them into this form at the sink. `json_schema()` is the JSON Schema (`mifa schema
--sample`); `SAMPLE_SCHEMA_VERSION` changes whenever a field is added, removed or retyped.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable

SAMPLE_SCHEMA_VERSION = 1
SCHEMA_ID = f"urn:mifa:sample-schema:{SAMPLE_SCHEMA_VERSION}"

FLAGS = ("image_valid", "labels_in_range")  # always computed: booleans with no `_valid` twin
NUMBERS: tuple[tuple[str, type], ...] = (  # (score, type) in their order in `scores`
    ("pixel_std", float), ("au_mae_requested", float),
    ("face_count", int), ("face_fraction", float), ("face_score", float),
    ("identity_cosine", float), ("identity_nearest_earlier_cosine", float),
    ("au_agreement", float), ("au_agreement_labels", float),
)
PER_AU: tuple[tuple[str, type], ...] = (("au_est_", float), ("au_agree_", int))
AU_PATTERN = "^AU[0-9]+$"
KEY_PATTERN = "^[A-Za-z0-9_-]+$"


def _number(value: Any, kind: type) -> tuple[Any, bool]:
    """(value in its one type, valid): 0 and False for a missing or non-finite number."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return kind(0), False
    return kind(value), True


def score_names(au_names: Iterable[str]) -> list[str]:
    """Every key of `scores`, in order, for a data set with these AUs."""
    names = list(FLAGS)
    for name, _ in NUMBERS:
        names += [name, f"{name}_valid"]
    for prefix, _ in PER_AU:
        for au in au_names:
            names += [f"{prefix}{au}", f"{prefix}{au}_valid"]
    return names


@functools.lru_cache(maxsize=16)
def _numeric_fields(au_names: tuple[str, ...]) -> tuple[tuple[str, str, type, Any], ...]:
    """(score, its flag, its type, its zero) of every numeric score, in order (made once per AU order:
    `public_scores` runs for every kept sample)."""
    fields = list(NUMBERS) + [(f"{prefix}{au}", kind) for prefix, kind in PER_AU for au in au_names]
    return tuple((name, f"{name}_valid", kind, kind(0)) for name, kind in fields)


def public_scores(raw: dict[str, Any], au_names: Iterable[str]) -> dict[str, Any]:
    """A sample's internal scores -> the published `scores`: every key present, one type each, no null.
    Scores outside the data set's AU order (an estimator's extra AUs) stay in the `scores/` tables only."""
    out: dict[str, Any] = {name: bool(raw.get(name)) for name in FLAGS}
    get, isfinite = raw.get, math.isfinite
    for name, valid, kind, zero in _numeric_fields(tuple(au_names)):
        value = get(name)
        if value is None:  # (the common cases first: `_number`'s answer without its call)
            out[name], out[valid] = zero, False
        elif value.__class__ is kind and isfinite(value):
            out[name], out[valid] = value, True
        else:
            out[name], out[valid] = _number(value, kind)
    return out


def _au_map(item: dict[str, Any], au_names: list[str] | None) -> dict[str, Any]:
    if au_names is None:
        return {"type": "object", "minProperties": 1, "propertyNames": {"pattern": AU_PATTERN},
                "additionalProperties": item}
    return {"type": "object", "properties": {au: item for au in au_names}, "required": list(au_names),
            "additionalProperties": False}


def json_schema(au_names: list[str] | None = None) -> dict[str, Any]:
    """The JSON Schema of a `KEY.json` member; with `au_names`, exactly those AU keys (one data set's)."""
    number = {"type": "number"}
    integer = {"type": "integer"}
    boolean = {"type": "boolean"}
    score_props: dict[str, Any] = {name: boolean for name in FLAGS}
    for name, kind in NUMBERS:
        score_props[name] = integer if kind is int else number
        score_props[f"{name}_valid"] = boolean
    per_au = {prefix: (integer if kind is int else number) for prefix, kind in PER_AU}
    scores: dict[str, Any] = {"type": "object", "properties": score_props, "required": list(score_props),
                              "additionalProperties": False}
    if au_names is None:
        scores["patternProperties"] = {
            **{f"^{prefix}AU[0-9]+$": item for prefix, item in per_au.items()},
            **{f"^{prefix}AU[0-9]+_valid$": boolean for prefix in per_au},
        }
    else:
        for prefix, item in per_au.items():
            for au in au_names:
                score_props[f"{prefix}{au}"] = item
                score_props[f"{prefix}{au}_valid"] = boolean
        scores["required"] = list(score_props)
    prop = {
        "key": {"type": "string", "pattern": KEY_PATTERN, "description": "idIIIIIII-sSSSS: identity and sample index"},
        "dataset": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
                    "additionalProperties": False, "description": "the data set's name (its version is the folder's)"},
        "identity": {"type": "integer", "minimum": 0, "description": "identity index (also KEY.cls)"},
        "sample": {"type": "integer", "minimum": 0, "description": "sample index within the identity"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "description": "the sample's generation seed"},
        "model": {"type": "string", "description": "the generator ('builtin:demo', 'builtin:teacher-renderer' or a path)"},
        "prompt": {"type": "string"},
        "expression": {"type": "string", "description": "the expression the prompt asked for"},
        "demographics": {"type": "object", "additionalProperties": {"type": "string"},
                         "description": "the identity's drawn attributes (keys fixed per data set)"},
        "requested_aus": _au_map({"type": "integer", "minimum": 0, "maximum": 5}, au_names)
                         | {"description": "FACS intensity 0-5 the prompt asked for"},
        "occurrence_prob": _au_map({"type": "number", "minimum": 0, "maximum": 1}, au_names)
                           | {"description": "generated occurrence probability"},
        "occurrence": _au_map({"type": "integer", "enum": [0, 1]}, au_names)
                      | {"description": "1 where occurrence_prob >= 0.5"},
        "intensity": _au_map({"type": "number", "minimum": 0, "maximum": 5}, au_names)
                     | {"description": "generated FACS intensity, float 0-5"},
        "intensity_rounded": _au_map({"type": "integer", "minimum": 0, "maximum": 5}, au_names)
                             | {"description": "intensity rounded to the nearest integer"},
        "scores": scores | {"description": "filter scores; each number X has X_valid (false: not computed, X is 0)"},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"mifa sample (KEY.json), schema version {SAMPLE_SCHEMA_VERSION}",
        "description": "One sample's labels and metadata. Every field has one type in every sample; nothing is null. "
                       "AU maps keep the data set's AU order (manifest.json `au_names`).",
        "type": "object",
        "properties": prop,
        "required": list(prop),
        "additionalProperties": False,
    }


def validator(au_names: list[str] | None = None):
    """A compiled validator of `json_schema(au_names)` (jsonschema), for verify and tests."""
    import jsonschema

    cls = jsonschema.validators.validator_for(json_schema())
    return cls(json_schema(au_names))
