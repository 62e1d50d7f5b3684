"""The configuration reference (`docs/config.md`), generated from the typed sections so that
every option is documented in one place and cannot drift from what the loader accepts.

Regenerate: `.venv/bin/python -m hmgdm_core.config_reference > docs/config.md`.
"""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hmgdm_core.config import SITE_SECTIONS, HmgdmConfig

HEADER = """# Configuration reference

Every key hmgdm reads from a TOML config, by section. A file may set any subset; what it leaves
out takes the default shown. Unknown keys and invalid values are refused at load with an error
naming the file and the key. Commented presets: `configs/*.toml`.

Generated from the code (`hmgdm_core/config.py` and the sections it imports); regenerate with
`.venv/bin/python -m hmgdm_core.config_reference > docs/config.md` (a test checks it is current).
"""


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " \\| ".join(f'"{a}"' for a in args)
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        return " \\| ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "none"
    if isinstance(tp, type) and issubclass(tp, Path):
        return "path"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " \\| ".join(f'"{m.value}"' for m in tp)
    return getattr(tp, "__name__", str(tp))


def _default(value: Any) -> str:
    if value is PydanticUndefined:
        return "(required)"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return f"[{', '.join(_default(v) for v in value)}]"
    return str(value)


def _sections(cls: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    """(dotted name, model) for this model's sub-sections, depth first."""
    out = []
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            dotted = f"{prefix}.{name}" if prefix else name
            out += [(dotted, field.annotation), *_sections(field.annotation, dotted)]
    return out


def reference_markdown(root: type[BaseModel] = HmgdmConfig) -> str:
    parts = [HEADER]
    # A site's own [local_dp] and [disclosure] are read from its file only, never part of a
    # run's config.
    for dotted, cls in [*_sections(root, ""), *SITE_SECTIONS.items()]:
        doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        rows = [
            f"| `{name}` | {_type_name(f.annotation)} | {_default(f.default)} | {f.description} |"
            for name, f in cls.model_fields.items()
            if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))
        ]
        parts.append(
            f"## [{dotted}]\n\n{doc}\n\n| key | type | default | meaning |\n|---|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference_markdown(), end="")
