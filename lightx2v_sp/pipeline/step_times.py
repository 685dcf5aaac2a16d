"""What the first denoise step paid once: the first step's wall time against the median of the rest.

Compilation (model.compile), kernels compiled or loaded on first use (FlashAttention-4 when it was
not prepared in the loader thread, CUDA's lazy module loading), cuDNN execution plans and cuBLAS
heuristics all land in step 1; a warm step costs what every later step costs. The summary records
both, so a run's fixed cost and its per-step cost can be read apart.
"""
from __future__ import annotations

import statistics
from typing import Optional, Sequence


def first_step_cost(step_times: Sequence[float]) -> dict[str, Optional[float]]:
    """{"median_step_s": median of steps 2..n, "first_step_extra_s": step 1 minus it} (None below 2 steps)."""
    if len(step_times) < 2:
        return {"median_step_s": None, "first_step_extra_s": None}
    rest = statistics.median(step_times[1:])
    return {"median_step_s": round(rest, 4), "first_step_extra_s": round(step_times[0] - rest, 4)}
