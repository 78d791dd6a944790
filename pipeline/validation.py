"""Turn pydantic's validation errors into one line per problem: `path: what is wrong, got what`.

Used by every document a user writes (pipeline settings, job documents), so that all of them report
every error at once, each with its dotted path, and name the closest valid key for a typo.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Plain data with explicit validation: unknown keys are errors and types are real types
    ("true" is not a boolean, "5" and true are not numbers, NaN and Infinity are not numbers either)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(document)"


ECHO_CHARS = 60


def show(value: Any) -> str:
    """A value as an error message echoes it: JSON, cut to a short prefix (a 50 MB value must not
    become a 50 MB error, log line and API answer)."""
    if isinstance(value, str) and len(value) > ECHO_CHARS:
        value = value[:ECHO_CHARS]  # cut before encoding: never serialise the whole of a huge value
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (ValueError, RecursionError):
        text = "(unprintable)"
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 3] + "..."


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the object at `loc` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if current is None:
            for arg in getattr(annotation, "__args__", ()):  # Optional[Model]
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    current = arg
    return list(getattr(current, "model_fields", {}))


def explain(error: ValidationError, model: type[BaseModel], forbidden: dict[str, str] | None = None) -> list[str]:
    """One sentence per error, in document order. `forbidden` maps keys that are unknown on purpose
    (a job may not pick its container image) to the reason, which replaces "did you mean"."""
    lines = []
    for err in error.errors(include_url=False):
        loc, kind, ctx, got = tuple(err["loc"]), err["type"], err.get("ctx", {}), err.get("input")
        path = _path(loc)
        if kind == "extra_forbidden" and forbidden and loc[-1] in forbidden:
            lines.append(f"{path}: not allowed; {forbidden[loc[-1]]}")
        elif kind == "extra_forbidden":
            valid = _known_keys(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            lines.append(f"{path}: unknown key; {hint}")
        elif kind == "missing":
            lines.append(f"{path}: required, but missing")
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            sign = {"greater_than_equal": "≥", "greater_than": ">", "less_than_equal": "≤", "less_than": "<"}[kind]
            bound = next(iter(ctx.values()))
            bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
            lines.append(f"{path}: must be {sign} {bound}, got {show(got)}")
        elif kind in ("literal_error", "enum"):
            lines.append(f"{path}: must be one of {ctx.get('expected')}, got {show(got)}")
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            wanted = {
                "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
                "list": "a list", "dict": "an object", "model": "an object",
            }.get(kind.split("_")[0], kind.replace("_", " "))
            lines.append(f"{path}: must be {wanted}, got {show(got)}")
        else:
            msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(f"{path}: {msg[0].lower() + msg[1:] if msg else msg}")
    return lines
