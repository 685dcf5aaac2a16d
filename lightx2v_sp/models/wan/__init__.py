from .config import WanConfig
from .loader import load_wan, model_from_state_dict, save_pretrained
from .model import WanModel
from .parallelize import parallelize_wan

__all__ = ["WanConfig", "WanModel", "load_wan", "model_from_state_dict", "parallelize_wan", "save_pretrained"]
