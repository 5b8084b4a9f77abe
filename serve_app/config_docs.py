"""The README's configuration tables, generated from `serve_app.config` (where defaults live).

    python -m serve_app.config_docs        # prints the markdown between the README's config markers

tests/test_config_docs.py fails when README.md's copy differs, so a changed default or
description shows up in review as a README change too.
"""

from __future__ import annotations

from typing import Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from serve_app.config import AppArgs, AppWideArgs, ModelArgs

BEGIN = "<!-- config:begin -->"
END = "<!-- config:end -->"


def default_text(name: str, field: FieldInfo) -> str:
    """A field's default as a reader would write it in serve_config.yaml ("unset": the description says)."""
    if field.default_factory is not None:
        value = field.default_factory()
        if name == "models":  # the built-in models, by name
            return ", ".join(f"`{m.model_name}`" for m in value)
        return "see below"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def literal_choices(annotation) -> list[str]:
    """The values a Literal field (or an optional one) accepts; none for other types."""
    if get_origin(annotation) is Literal:
        return [str(v) for v in get_args(annotation)]
    return [c for arg in get_args(annotation) for c in literal_choices(arg)]


def rows(model: type[BaseModel], prefix: str = "", only: set[str] | None = None) -> list[str]:
    """One table line per field; a nested model's fields follow as `<field>.<name>`."""
    out = []
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel):
            out += rows(nested, f"{prefix}{name}.")
            continue
        description = " ".join((field.description or "").split())
        if choices := literal_choices(field.annotation):
            description += " One of " + ", ".join(f"`{c}`" for c in choices) + "."
        out.append(f"| `{prefix}{name}` | {default_text(name, field)} | {description} |")
    return out


def render() -> str:
    """The markdown that goes between BEGIN and END in README.md."""
    head = ["| field | default | meaning |", "|---|---|---|"]
    return "\n".join([
        "Per model (an entry of `models`; for a single model, these may sit directly under `args`):",
        "",
        *head, *rows(ModelArgs),
        "",
        "Whole app (beside `models`):",
        "",
        *head, *rows(AppArgs, only={"models"}), *rows(AppWideArgs),
    ])


if __name__ == "__main__":
    print(render())
