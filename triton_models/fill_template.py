"""Fill `${name}` placeholders in config.pbtxt templates.

Same CLI shape as tensorrtllm_backend's tool, but strict: a key that the template does not contain
and a placeholder left unfilled are errors, so a typo cannot ship a half-filled config.

    python -m triton_models.fill_template -i repo/tensorrt_llm/config.pbtxt \\
        triton_max_batch_size:8,decoupled_mode:true,engine_dir:/engines/llm
    (`\\,` puts a literal comma into a value; values may contain `:`)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

# Only the braced form: a bare `$` can legitimately appear in a pbtxt string value.
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ANY_BRACED = re.compile(r"\$\{[^}]*\}")
_UNESCAPED_COMMA = re.compile(r"(?<!\\),")


def placeholders(text: str) -> set[str]:
    """Names of the `${name}` placeholders in `text`."""
    return set(_PLACEHOLDER.findall(text))


def unused_values(values: Mapping[str, object], texts) -> list[str]:
    """Keys of `values` that no template among `texts` has a placeholder for (a typo or a dead value)."""
    used = set().union(*(placeholders(t) for t in texts))
    return sorted(set(values) - used)


def _as_text(value: object) -> str:
    # Protobuf text format spells booleans in lower case; str(True) would be "True".
    return str(value).lower() if isinstance(value, bool) else str(value)


def fill_template(text: str, values: Mapping[str, object], *, partial: bool = False) -> str:
    """Substitute `values` into `text`.

    Raises ValueError for a key with no `${key}` in the template, and (unless `partial`, for
    filling in several passes) for any `${...}` still present afterwards.
    """
    unknown = sorted(set(values) - placeholders(text))
    if unknown:
        raise ValueError(
            f"template has no placeholder for {unknown}; its placeholders are {sorted(placeholders(text))}"
        )
    filled = _PLACEHOLDER.sub(lambda m: _as_text(values[m.group(1)]) if m.group(1) in values else m.group(0), text)
    leftover = sorted(set(_ANY_BRACED.findall(filled)))
    if leftover and not partial:
        raise ValueError(f"placeholders left unfilled: {leftover}")
    return filled


def parse_substitutions(spec: str) -> dict[str, str]:
    """`k1:v1,k2:v2` -> dict; `\\,` is a literal comma; a value keeps any further `:`."""
    values: dict[str, str] = {}
    for item in _UNESCAPED_COMMA.split(spec):
        if not item.strip():
            continue
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"substitution {item!r} is not of the form key:value")
        values[key.strip()] = value.replace("\\,", ",")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("file", type=Path, help="config.pbtxt template")
    parser.add_argument("substitutions", help="key:value pairs separated by commas")
    parser.add_argument("-i", "--in_place", action="store_true", help="rewrite the file instead of printing the result")
    parser.add_argument("--partial", action="store_true", help="allow placeholders to stay (fill in several passes)")
    args = parser.parse_args(argv)
    try:
        filled = fill_template(args.file.read_text(), parse_substitutions(args.substitutions), partial=args.partial)
    except ValueError as exc:
        print(f"fill_template: {args.file}: {exc}", file=sys.stderr)
        return 2
    if args.in_place:
        args.file.write_text(filled)
    else:
        sys.stdout.write(filled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
