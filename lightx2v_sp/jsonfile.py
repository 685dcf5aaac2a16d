"""Reading small JSON files (checkpoint configs) that may be missing or malformed."""
from __future__ import annotations

import json
from typing import Optional


def read_json(path: str) -> Optional[dict]:
    """The JSON object in `path`, or None when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
