"""The tokenizer without transformers: tokenizer.json through the `tokenizers` library, set up as a
transformers fast tokenizer is for padding="max_length", truncation=True. Compared with transformers'
fast tokenizer on the same file (ids and masks equal), on the tiny model's tokenizer, a word-level
one and a T5-style one (NFKC normalizer, Metaspace, byte fallback, </s> appended, extra ids)."""
import json
import string

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lightx2v_sp.models import tiny
from lightx2v_sp.models.t5.tokenizer import FastTokenizer, load_tokenizer, token_count, tokenize

PROMPTS = ["a red fox runs over the lazy dog", "", "  café  über   日本語 テスト <extra_id_1> x ",
           "色调艳丽，过曝，静态，细节模糊不清，字幕", "€ ☃ 🦊" * 3, "&lt;b&gt; golden hour &amp;amp; light",
           "the " * 40]


def _t5_style(path, tokenizer_class="T5Tokenizer", **config):
    words = ["red", "fox", "runs", "over", "the", "lazy", "dog", "golden", "hour", "café", "日本", "色调"]
    chars = string.ascii_letters + string.digits + string.punctuation + "éüï日本語テスト色调艳丽过曝静态"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [("\u2581" + c, -2.5) for c in chars] + [(c, -3.0) for c in chars]
    vocab += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    extra = [f"<extra_id_{i}>" for i in range(3)]
    tok.add_special_tokens([AddedToken(t, special=True) for t in ["<pad>", "</s>", "<unk>"] + extra])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            additional_special_tokens=extra).save_pretrained(path)
    with open(path / "tokenizer_config.json") as f:
        cfg = json.load(f)
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump({**cfg, "tokenizer_class": tokenizer_class, "extra_ids": 3, **config}, f)


def _word_level(path):
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "fox": 5, "runs": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>").save_pretrained(path)


def _reference(path):
    """transformers' fast tokenizer loading the directory (tokenizer.json as it is, the class Wan's
    transformers 4 loaded it as), its special tokens and sides resolved by transformers from the files."""
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


@pytest.mark.parametrize("kind", ["tiny", "word_level", "t5_style"])
@pytest.mark.parametrize("text_len", [1, 3, 16, 64])
def test_same_ids_and_mask_as_transformers(tmp_path, kind, text_len):
    if kind == "tiny":
        path = tmp_path / "tok"
        tiny._write_tokenizer(str(path))
    else:
        path = tmp_path / kind
        (_t5_style if kind == "t5_style" else _word_level)(path)
    ours = load_tokenizer(path)
    assert isinstance(ours, FastTokenizer)
    ids, mask = tokenize(ours, PROMPTS, text_len)
    ref_ids, ref_mask = tokenize(_reference(path), PROMPTS, text_len)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(PROMPTS), text_len)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    ref = _reference(path)
    assert [token_count(ours, p) for p in PROMPTS] == [token_count(ref, p) for p in PROMPTS]


def test_the_files_pipeline_is_kept(tmp_path):
    """The file's normalizer and byte fallback take effect: a full-width comma is NFKC's ',' and an
    emoji becomes byte pieces, not <unk> (transformers 5's T5Tokenizer class rebuilds the pipeline
    without either; Wan's own code loaded the file as it is, with transformers 4.x)."""
    _t5_style(tmp_path)
    ours = load_tokenizer(tmp_path)
    a, _ = tokenize(ours, ["色调，过曝", "色调,过曝", "🦊"], 12)
    assert torch.equal(a[0], a[1])
    assert 2 not in a[2].tolist() and a[2][1:5].tolist() == [ours.tokenizer.token_to_id(f"<0x{b:02X}>")
                                                             for b in "🦊".encode()]  # after the "▁" piece


def _edit(path, tokenizer_json=None, config=None, special_tokens_map=None, drop=()):
    if tokenizer_json is not None:
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer_json(tok)
        tok.save(str(path / "tokenizer.json"))
    with open(path / "tokenizer_config.json") as f:
        cfg = json.load(f)
    cfg = {k: v for k, v in {**cfg, **(config or {})}.items() if k not in drop}
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(cfg, f)
    if special_tokens_map is not None:
        with open(path / "special_tokens_map.json", "w") as f:
            json.dump(special_tokens_map, f)


PAD_DECODER = {"0": {"content": "<pad>", "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False}}
# where the pad token and the sides come from, as transformers works them out
FILE_CASES = {
    "sides in the config": dict(config={"padding_side": "left", "truncation_side": "left"}),
    "sides only in tokenizer.json": dict(tokenizer_json=lambda t: (
        t.enable_padding(direction="left", pad_id=0, pad_token="<pad>"),
        t.enable_truncation(max_length=512, direction="left"))),
    "pad token only in tokenizer.json": dict(tokenizer_json=lambda t: t.enable_padding(pad_id=0, pad_token="<pad>"),
                                             drop=("pad_token",)),
    "legacy config: the special tokens map wins": dict(config={"pad_token": "</s>"},
                                                        special_tokens_map={"pad_token": "<pad>"}),
    "added_tokens_decoder: the map is not read": dict(config={"pad_token": "</s>", "added_tokens_decoder": PAD_DECODER},
                                                      special_tokens_map={"pad_token": "<pad>"}),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_pad_token_and_sides_from_the_files_as_transformers(tmp_path, case):
    _t5_style(tmp_path)
    _edit(tmp_path, **FILE_CASES[case])
    ids, mask = tokenize(load_tokenizer(tmp_path), PROMPTS, 5)
    ref_ids, ref_mask = tokenize(_reference(tmp_path), PROMPTS, 5)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    if "sides" in case:
        assert mask[1].tolist() == [0, 0, 0, 0, 1]  # left padding took effect


def test_missing_pad_token(tmp_path):
    _t5_style(tmp_path)
    _edit(tmp_path, drop=("pad_token",))
    with pytest.raises(ValueError, match="no padding token"):
        tokenize(load_tokenizer(tmp_path), ["a"], 4)
    _edit(tmp_path, config={"pad_token": "<nope>"})
    with pytest.raises(ValueError, match="not in its vocabulary"):
        tokenize(load_tokenizer(tmp_path), ["a"], 4)
