"""Text-to-video runner: encode -> denoise (Ulysses, CFG-parallel) -> decode -> save."""
from .checks import AgreedError, agreed, check_layout
from .paths import ModelPaths, model_paths_for, resolve_model_paths
from .runner import RunResult, run

__all__ = ["AgreedError", "ModelPaths", "RunResult", "agreed", "check_layout", "model_paths_for",
           "resolve_model_paths", "run"]
