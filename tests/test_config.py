import glob
import os

import pytest

from lightx2v_sp.config import RunConfig, _leaf_fields, describe, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_configs():
    assert any(p.endswith("wan_t2v_tiny.yaml") for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.parallel.ulysses_degree >= 0  # 0 = auto (all ranks cfg_degree leaves)


def test_overrides_are_typed():
    cfg = load_config(None, ["sample.steps=3", "parallel.fuse_qkv=false", "parallel.comm_dtype=fp8",
                             "sample.guidance_scale=7", "model.path=/ckpt"])
    assert cfg.sample.steps == 3 and cfg.parallel.fuse_qkv is False
    assert cfg.parallel.comm_dtype == "fp8" and cfg.sample.guidance_scale == 7.0
    assert cfg.model.path == "/ckpt"


def test_defaults_are_the_fast_path():
    cfg = load_config(None)
    assert cfg.parallel.fuse_qkv is True and cfg.parallel.a2a == "all_to_all"


@pytest.mark.parametrize("override, hint", [
    ("parallel.ulyses_degree=2", "did you mean parallel.ulysses_degree?"),
    ("ulysses_degree=2", "did you mean parallel.ulysses_degree?"),
    ("sample.stpes=2", "did you mean sample.steps?"),
    ("paralel.a2a=round_robin", "did you mean parallel"),
])
def test_typos_name_the_closest_key(override, hint):
    with pytest.raises(ValueError, match="unknown config key") as err:
        load_config(None, [override])
    assert hint in str(err.value)


def test_typo_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("parallel:\n  ulysses_degre: 2\n")
    with pytest.raises(ValueError, match=r"did you mean parallel\.ulysses_degree\?"):
        load_config(str(path))


@pytest.mark.parametrize("override, key, expected", [
    ("sample.steps=many", "sample.steps", "int"),
    ("parallel.fuse_qkv=maybe", "parallel.fuse_qkv", "bool"),
    ("seed=1.5", "seed", "int"),
])
def test_wrong_type_names_key_and_type(override, key, expected):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert f"'{key}'" in msg and f"expects {expected}" in msg
    assert "\n" not in msg  # one clear line


@pytest.mark.parametrize("override, fragment", [
    ("parallel.a2a=ring", "not one of ['all_to_all', 'round_robin']"),
    ("parallel.comm_dtype=fp4", "not one of [None, 'fp8']"),
    ("parallel.cfg_degree=3", "not one of [1, 2]"),
    ("sample.num_frames=80", "must be 4k+1"),
    ("sample.height=100", "multiples of 16"),
    ("sample.steps=0", "must be >= 1"),
])
def test_bad_values(override, fragment):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


@pytest.mark.parametrize("scale", ["1.0", "0.5", "0", "-2"])
def test_cfg_parallel_without_guidance_is_rejected(scale):
    """diffusers turns guidance off at guidance_scale <= 1 (WanPipeline.do_classifier_free_guidance)."""
    with pytest.raises(ValueError, match="cfg_degree=2 needs classifier-free guidance"):
        load_config(None, ["parallel.cfg_degree=2", f"sample.guidance_scale={scale}"])
    with pytest.raises(ValueError, match="guidance_scale_2 = 3.0 needs the unconditional pass"):
        load_config(None, [f"sample.guidance_scale={scale}", "sample.guidance_scale_2=3.0"])


def test_missing_file_and_bad_override_syntax():
    with pytest.raises(ValueError, match="config file not found"):
        load_config("/nonexistent.yaml")
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["sample.steps"])


def test_every_field_is_documented():
    docs = list(_leaf_fields(RunConfig))
    assert len(docs) > 20
    for key, f in docs:
        assert f.metadata.get("doc"), f"{key} has no doc"
    assert "parallel.comm_dtype" in describe()


def test_describe_shows_the_values_a_config_gives():
    cfg = load_config(os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml"), ["parallel.a2a=round_robin"])
    lines = {line.split(" = ")[0]: line for line in describe(cfg).splitlines()}
    assert lines["sample.steps"].startswith("sample.steps = 4 (schema default 50)")
    assert lines["parallel.a2a"].startswith("parallel.a2a = 'round_robin' ['all_to_all', 'round_robin'] "
                                            "(schema default 'all_to_all')")
    assert lines["seed"].startswith("seed = 42  #")  # equal to the default: no note
    assert describe().splitlines()[0].startswith("model.path = None  #")


def test_compile_and_block_offload_are_exclusive():
    assert load_config(None, ["model.compile=true"]).model.compile is True
    with pytest.raises(ValueError, match="model.compile=true with offload.dit=block"):
        load_config(None, ["model.compile=true", "offload.dit=block"])


def test_fp8_accumulation_needs_fp8_weights():
    assert load_config(None, ["model.quant=fp8", "model.fp8_accum=fast"]).model.fp8_accum == "fast"
    assert load_config(None, []).model.fp8_accum == "exact"  # the lossier accumulator is opt-in
    with pytest.raises(ValueError, match="model.fp8_accum = 'fast' sets how FP8 GEMMs accumulate, but model.quant"):
        load_config(None, ["model.fp8_accum=fast"])
    with pytest.raises(ValueError, match="is not one of"):
        load_config(None, ["model.quant=fp8", "model.fp8_accum=bf16"])


def test_expert_and_image_keys():
    cfg = load_config(None, ["image=frame.png", "sample.guidance_scale_2=3.0", "sample.boundary_ratio=0.9",
                             "offload.dit=swap", "image_encoder.device=swap", "model.tiny=wan2.2-i2v-a14b"])
    assert cfg.image == "frame.png" and cfg.sample.guidance_scale_2 == 3.0 and cfg.sample.boundary_ratio == 0.9
    assert cfg.sample.image_resize == "stretch"  # diffusers' default
    with pytest.raises(ValueError, match="model.compile=true with offload.dit=swap"):
        load_config(None, ["model.compile=true", "offload.dit=swap"])
    with pytest.raises(ValueError, match="boundary_ratio = 1.5 must be in"):
        load_config(None, ["sample.boundary_ratio=1.5"])
    with pytest.raises(ValueError, match="guidance_scale_2 = 3.0 needs the unconditional pass"):
        load_config(None, ["sample.guidance_scale=1.0", "sample.guidance_scale_2=3.0"])
    with pytest.raises(ValueError, match="is not one of"):
        load_config(None, ["sample.image_resize=pad"])
