"""WanConfig: the shape of a Wan2.1 DiT, and its two on-disk spellings (official, diffusers)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional


@dataclass
class WanConfig:
    dim: int = 1536
    num_heads: int = 12
    num_layers: int = 30
    ffn_dim: int = 8960
    in_dim: int = 16                 # latent channels in (I2V: 36 = latents + mask + image latents)
    out_dim: int = 16
    text_dim: int = 4096             # UMT5-XXL hidden size
    freq_dim: int = 256              # sinusoidal time-embedding width
    text_len: int = 512              # context tokens the model was trained with
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # "t2v", or "i2v": the input is [noise | mask | image latents] (in_dim = 2 * out_dim + 4). Wan2.2's
    # I2V experts stop there; Wan2.1's also attend to CLIP image tokens (image_dim set).
    model_type: str = "t2v"
    image_dim: Optional[int] = None  # width of the CLIP image tokens (1280, ViT-H/14); None = no image branch
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys of the source config, kept for saving

    def __post_init__(self):
        for name in ("dim", "num_heads", "num_layers", "ffn_dim", "in_dim", "out_dim", "text_dim", "freq_dim",
                     "text_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Wan config {name}={value!r} must be a positive integer; the checkpoint's "
                                 "config.json is broken")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type={self.model_type!r}: only text-to-video ('t2v') and image-to-video "
                             f"('i2v') Wan models are implemented")
        if self.image_dim is not None and self.model_type != "i2v":
            raise ValueError(f"image_dim={self.image_dim} (a CLIP image branch) on a {self.model_type!r} model; only "
                             "Wan2.1 I2V DiTs have one")
        if self.model_type == "i2v" and self.in_dim != 2 * self.out_dim + 4:
            raise ValueError(f"model_type='i2v' with in_dim={self.in_dim}, out_dim={self.out_dim}: an I2V DiT takes "
                             f"noise + 4 mask + image latent channels = {2 * self.out_dim + 4}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (t, h, w), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}; heads would be ragged")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim={self.head_dim} must be even and >= 6 for the 3-D rotary embedding")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even (cos and sin halves)")

    @property
    def condition_dim(self) -> int:
        """Input channels beyond the noisy latents (I2V: 4 mask + out_dim image-latent channels)."""
        return self.in_dim - self.out_dim if self.model_type == "i2v" else 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head channels given to the frame, height and width positions (Wan's split)."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    # Named configs of the released checkpoints.
    @classmethod
    def t2v_1_3b(cls) -> "WanConfig":
        return cls(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960)

    @classmethod
    def t2v_14b(cls) -> "WanConfig":
        return cls(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824)

    @classmethod
    def i2v_14b(cls) -> "WanConfig":
        """Wan2.1-I2V-14B (480P and 720P): 36 input channels and the CLIP ViT-H/14 image branch."""
        return cls(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824, in_dim=36, model_type="i2v", image_dim=1280)

    @classmethod
    def ti2v_5b(cls) -> "WanConfig":
        """Wan2.2-TI2V-5B: 48 latent channels in and out (the Wan2.2 VAE), 24 heads."""
        return cls(dim=3072, num_heads=24, num_layers=30, ffn_dim=14336, in_dim=48, out_dim=48)

    @classmethod
    def i2v_a14b(cls) -> "WanConfig":
        """One expert of Wan2.2-I2V-A14B (Wan2.2-T2V-A14B's experts are t2v_14b)."""
        return cls(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824, in_dim=36, model_type="i2v")

    @classmethod
    def tiny(cls, **overrides) -> "WanConfig":
        """Real architecture at toy size (tests, CPU benches): 6 heads split over 2 or 3 ranks."""
        return cls(**{"dim": 96, "num_heads": 6, "num_layers": 2, "ffn_dim": 256, "text_dim": 64,
                      "freq_dim": 32, **overrides})

    @classmethod
    def named(cls, name: str) -> "WanConfig":
        table = {"tiny": cls.tiny, "1.3b": cls.t2v_1_3b, "t2v-1.3b": cls.t2v_1_3b, "14b": cls.t2v_14b, "t2v-14b": cls.t2v_14b,
                 "t2v-a14b": cls.t2v_14b, "i2v-a14b": cls.i2v_a14b, "i2v-14b": cls.i2v_14b,
                 "ti2v-5b": cls.ti2v_5b}
        if name.lower() not in table:
            raise ValueError(f"unknown Wan config {name!r}; known: {sorted(table)}")
        return table[name.lower()]()

    # --- official Wan2.1 config.json -------------------------------------------------------------
    def to_official(self) -> dict:
        # the official config has no image_dim: the loader reads it off the img_emb weights
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "rope_theta", "text_dim", "image_dim")}
        d["patch_size"] = list(self.patch_size)
        d["text_dim"] = self.text_dim
        return {"_class_name": "WanModel", **d, **self.extra}

    @classmethod
    def from_official(cls, cfg: dict) -> "WanConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        # Keys the official WanModel accepts that we ignore on purpose (window attention is unused by Wan2.1).
        ignored = {"_class_name", "_diffusers_version", "window_size"}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        extra = {k: v for k, v in cfg.items() if k not in known and k not in ignored}
        return cls(**kwargs, extra=extra)

    # --- diffusers WanTransformer3DModel config.json ---------------------------------------------
    def to_diffusers(self) -> dict:
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_dim,
            "out_channels": self.out_dim,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if self.qk_norm else None,
            "eps": self.eps,
            "image_dim": self.image_dim,
            "added_kv_proj_dim": self.dim if self.image_dim is not None else None,
            "rope_max_seq_len": 1024,
            "pos_embed_seq_len": None,
        }

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "WanConfig":
        heads = cfg.get("num_attention_heads", 40)
        dim = heads * cfg.get("attention_head_dim", 128)
        image_dim, kv_dim = cfg.get("image_dim"), cfg.get("added_kv_proj_dim")
        if (image_dim is None) != (kv_dim is None) or kv_dim not in (None, dim):
            raise ValueError(f"diffusers config has image_dim={image_dim}, added_kv_proj_dim={kv_dim}: Wan2.1 I2V "
                             f"has both, with added_kv_proj_dim = the model width {dim}; this layout is not Wan's")
        if cfg.get("pos_embed_seq_len") is not None:
            raise ValueError(f"diffusers config has pos_embed_seq_len={cfg['pos_embed_seq_len']}: a first-last-frame "
                             "(FLF2V) model, which is not implemented")
        qk_norm = cfg.get("qk_norm", "rms_norm_across_heads")
        if qk_norm not in (None, "rms_norm_across_heads"):
            raise ValueError(f"qk_norm={qk_norm!r} is not a Wan2.1 layout (expected 'rms_norm_across_heads')")
        return cls(
            dim=dim,
            num_heads=heads,
            num_layers=cfg.get("num_layers", 40),
            ffn_dim=cfg.get("ffn_dim", 13824),
            in_dim=cfg.get("in_channels", 16),
            out_dim=cfg.get("out_channels") or cfg.get("in_channels", 16),
            text_dim=cfg.get("text_dim", 4096),
            freq_dim=cfg.get("freq_dim", 256),
            eps=cfg.get("eps", 1e-6),
            patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
            cross_attn_norm=cfg.get("cross_attn_norm", True),
            # diffusers stores no model type; an I2V DiT is the one that takes more channels than it returns
            model_type="i2v" if cfg.get("in_channels", 16) > (cfg.get("out_channels") or cfg.get("in_channels", 16))
            else "t2v",
            image_dim=image_dim,
            # diffusers builds q/k norms whatever qk_norm says, so its checkpoints always carry them
            qk_norm=True,
        )
