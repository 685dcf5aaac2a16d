"""Prompts (and every other string key) are data; bad config files and values are one-line errors."""
import pytest

from lightx2v_sp.config import load_config, to_dict

TEXTS = ["...", "A cat: it walks", "it's a cat #1", "123", "true", "null", "${oc.env:HOME}", "${x} and ${",
         "a=b=c", "", "  two  spaces ", "[1, 2]", "{a: 1}", "日本語の猫"]


@pytest.mark.parametrize("text", TEXTS)
def test_override_strings_arrive_byte_for_byte(text):
    cfg = load_config(None, [f"prompt={text}", f"negative_prompt={text}", f"output.path={text}.mp4"])
    assert cfg.prompt == text and cfg.negative_prompt == text and cfg.output.path == f"{text}.mp4"
    assert to_dict(cfg)["prompt"] == text  # what the JSON summary records


def test_yaml_strings_are_not_interpolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/secret")
    path = tmp_path / "c.yaml"
    path.write_text('prompt: "${oc.env:HOME}"\nnegative_prompt: it\'s a cat #1\n'
                    'model: {path: null, vae_path: "${model.path}/vae"}\nsample: {steps: 3}\n')
    cfg = load_config(str(path))
    assert cfg.prompt == "${oc.env:HOME}" and cfg.negative_prompt == "it's a cat"  # YAML comment rules apply
    assert cfg.model.path is None and cfg.model.vae_path == "${model.path}/vae" and cfg.sample.steps == 3
    assert load_config(str(path), ["prompt=${oc.env:HOME}"]).prompt == "${oc.env:HOME}"


def test_yaml_scalars_keep_their_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompt: true\nnegative_prompt: 0x10\n")
    cfg = load_config(str(path))
    assert (cfg.prompt, cfg.negative_prompt) == ("true", "0x10")


def test_optional_strings_still_take_null():
    assert load_config(None, ["model.path=null"]).model.path is None
    assert load_config(None, ["model.path=/ckpt", "parallel.comm_dtype=fp8"]).parallel.comm_dtype == "fp8"
    assert load_config(None, ["parallel.comm_dtype=null"]).parallel.comm_dtype is None
    with pytest.raises(ValueError, match=r"not one of \['auto', 'cuda', 'cpu'\]"):
        load_config(None, ["device=${oc.env:HOME}"])


@pytest.mark.parametrize("text, fragment", [
    ("sample: {steps: 3\n", "is not valid YAML"),
    ("prompt: [unclosed\n", "line 2"),
    ("\tprompt: x\n", "is not valid YAML"),
])
def test_broken_yaml_is_one_line(tmp_path, text, fragment):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(str(path))
    assert fragment in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_config_directory_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="is a directory; give a YAML file"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("override, fragment", [
    ("sample.guidance_scale=nan", "'sample.guidance_scale' = nan is not a finite number"),
    ("sample.guidance_scale=inf", "'sample.guidance_scale' = inf is not a finite number"),
    ("sample.guidance_scale_2=nan", "'sample.guidance_scale_2' = nan is not a finite number"),
    ("sample.guidance_scale_2=-inf", "'sample.guidance_scale_2' = -inf is not a finite number"),
    ("sample.shift=-inf", "'sample.shift' = -inf is not a finite number"),
    ("sample.shift=0", "'sample.shift' = 0.0 must be > 0"),
    (f"seed={2 ** 64}", "'seed' = 18446744073709551616 is outside torch.Generator's range"),
    (f"seed={-2 ** 63 - 1}", "'seed' = -9223372036854775809 is outside"),
    ("sample.height=100000", "'sample.height' = 100000 must be <= 4096"),
    ("sample.width=8192", "'sample.width' = 8192 must be <= 4096"),
    ("sample.num_frames=2001", "'sample.num_frames' = 2001 must be <= 1025"),
    ("sample.steps=1001", "'sample.steps' = 1001 must be <= 1000"),
])
def test_bad_numbers_name_the_key(override, fragment):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_bounds_admit_the_edges():
    cfg = load_config(None, [f"seed={2 ** 64 - 1}", "sample.height=4096", "sample.num_frames=1025",
                             "sample.steps=1000"])
    assert (cfg.seed, cfg.sample.height, cfg.sample.num_frames, cfg.sample.steps) == (2 ** 64 - 1, 4096, 1025, 1000)
