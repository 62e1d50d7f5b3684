"""Slide ids: what makes a valid one, and which cached slide a name in a site's table means.

Ids are paths relative to the input folder without suffix (`2024/case7/HE`). Ids used to be
file stems (`HE`): tables written then (labels.csv, patients.csv), caches built then, and path
columns (`2024/case7/HE.svs`) still name the right slide when the match is unambiguous.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import PurePosixPath


def valid_slide_id(slide_id: str) -> bool:
    """Ids name files in the cache: relative, `/`-separated, no `.`/`..` or empty parts."""
    parts = slide_id.split("/")
    return (
        "\\" not in slide_id
        and "\0" not in slide_id
        and all(p not in ("", ".", "..") and p == p.strip() for p in parts)
    )


def id_from_path(path: str) -> str:
    """A path as a table may give it (`lung_aca/x.jpeg`) -> the slide id it builds to."""
    return PurePosixPath(path.replace("\\", "/")).with_suffix("").as_posix()


def _last(slide_id: str) -> str:
    return slide_id.rsplit("/", 1)[-1]


def match_slide_ids(
    names: Iterable[str], known: Iterable[str]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(name -> known id, name -> [ids] for names that fit several) for `names` not in `known`.

    A name that is an id matches itself. Otherwise a bare name (no `/`) matches the one known
    id ending in `/name` (a stem from an older table), and a path name matches the known id
    that is its last part (a cache built with stem ids). Names matching nothing are left out.
    """
    known = set(known)
    by_last: dict[str, list[str]] = defaultdict(list)
    for k in sorted(known):
        by_last[_last(k)].append(k)
    matched: dict[str, str] = {}
    ambiguous: dict[str, list[str]] = {}
    for name in set(names):
        if name in known:
            matched[name] = name
            continue
        fits = [k for k in by_last.get(_last(name), []) if "/" not in k or "/" not in name]
        if len(fits) == 1:
            matched[name] = fits[0]
        elif fits:
            ambiguous[name] = fits
    return matched, ambiguous
