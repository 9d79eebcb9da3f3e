"""Faults injected by tests from outside the config: a JSON file named by BOOTHFLOW_FAULTS.

Never part of a cache key or a flow parameter; reread on every call, so deleting the file ends the fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "BOOTHFLOW_FAULTS"


def fault(name: str) -> Any:
    """The value of fault `name` (e.g. kill_train_after_step: 3), or None when no such fault is set."""
    path = os.environ.get(ENV)
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text()).get(name)
