"""Text-to-video runner: encode -> denoise (Ulysses, CFG-parallel) -> decode -> save."""
from lightx2v_sp.distributed.mesh import check_layout

from .checks import AgreedError, agreed
from .paths import ModelPaths, model_paths_for, resolve_model_paths
from .runner import RunResult, run

__all__ = ["AgreedError", "ModelPaths", "RunResult", "agreed", "check_layout", "model_paths_for",
           "resolve_model_paths", "run"]
