"""String config values are data: they arrive byte for byte, from YAML and from the command line.

OmegaConf would resolve `${...}` interpolations in any string (`prompt='${oc.env:HOME}'` became
the home directory: an untrusted prompt could read the environment) and parses every override
value as YAML (`prompt=...` is a parser error, `prompt=it's a cat #1` loses `#1`, `prompt=123`
is an int). So for every `str` / `Optional[str]` field of the schema:
- a `key=value` override keeps the raw text after the first `=` (for `Optional[str]`, `null`
  and `~` still mean null);
- a YAML value is the scalar's text as the YAML parser read it (quotes and escapes applied,
  nothing resolved); a YAML null stays null.
These values never enter OmegaConf: it sees a neutral placeholder and the text is set on the
dataclass after conversion.
"""
from __future__ import annotations

from typing import Iterable, Optional

import yaml

NULL_WORDS = ("null", "Null", "NULL", "~")
_NULL_TAG = "tag:yaml.org,2002:null"


def is_string_field(f) -> bool:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t in ("str", "Optional[str]", "str | None", "typing.Optional[str]")


def is_optional(f) -> bool:
    return "Optional" in str(f.type) or "None" in str(f.type)


def override_text(value: str, optional: bool) -> Optional[str]:
    """The value of a `key=value` override of a string field: the raw text, or None for null."""
    return None if optional and value in NULL_WORDS else value


def yaml_strings(path: str, keys: Iterable[str]) -> dict[str, Optional[str]]:
    """{dotted key: scalar text or None} for the `keys` present in the YAML file as scalars."""
    with open(path, encoding="utf-8") as f:
        root = yaml.compose(f, Loader=yaml.SafeLoader)
    out: dict[str, Optional[str]] = {}
    for key in keys:
        node = root
        for part in key.split("."):
            if not isinstance(node, yaml.MappingNode):
                node = None
                break
            node = next((v for k, v in reversed(node.value)
                         if isinstance(k, yaml.ScalarNode) and k.value == part), None)
        if isinstance(node, yaml.ScalarNode):
            out[key] = None if node.tag == _NULL_TAG else node.value
    return out
