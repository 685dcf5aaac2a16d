"""UMT5 encoder: parity with transformers.UMT5EncoderModel, both checkpoint layouts, tokenizer.

Single process, fp32, tiny dims. Tolerance: our encoder and transformers' run the same fp32 math
with different kernels (SDPA vs eager, fused vs separate bias adds), so outputs of magnitude ~1-4
differ by float rounding (observed <= 1e-6); 1e-5 is 10x that and far below any real mistake
(a wrong bucket, head order or norm changes outputs by O(0.1-1)).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from lightx2v_sp.models.t5 import T5Config, T5Encoder, T5Shard, load_t5_encoder, parallelize_t5, save_t5_encoder
from lightx2v_sp.models.t5.loader import OFFICIAL_FILENAME, file_key
from lightx2v_sp.models.t5.model import relative_position_buckets
from lightx2v_sp.models.t5.tokenizer import clean_prompt, load_tokenizer, tokenize

ATOL = 1e-5
TINY = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2)


def hf_model(seed: int = 0, **overrides):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(**{**TINY, **overrides}, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     attn_implementation="eager")
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():  # HF's init makes the bias tiny; a large one makes a wrong bucket visible
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
    return model


def inputs(seed: int = 1, batch: int = 3, length: int = 150, lengths=(150, 100, 7)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (batch, length), generator=g)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def hf_out(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = hf_model()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, str(path)


def test_buckets_match_transformers():
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    attn = UMT5Attention(UMT5Config(is_decoder=False, relative_attention_num_buckets=32,
                                    relative_attention_max_distance=128), has_relative_attention_bias=True)
    # lengths beyond max_distance reach the saturated log buckets on both sides
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    assert torch.equal(relative_position_buckets(300, 300, 32, 128), attn._relative_position_bucket(rel))


def test_matches_transformers_with_padding(hf_dir):
    model, path = hf_dir
    enc = T5Encoder.from_pretrained(path)
    ids, mask = inputs()
    ref = hf_out(model, ids, mask)
    with torch.no_grad():
        out = enc(ids, mask)
        no_mask = enc(ids)
    assert out.shape == ref.shape == (3, 150, 32)
    assert (out - ref).abs().max() < ATOL  # padding positions included: same math as the reference
    assert (no_mask - hf_out(model, ids, torch.ones_like(ids))).abs().max() < ATOL
    assert (out[2, :7] - no_mask[2, :7]).abs().max() > 1e-2  # the mask really matters


def test_replicate_layout_zeroes_padding(hf_dir):
    model, path = hf_dir
    enc = parallelize_t5(T5Encoder.from_pretrained(path), dims=None, mode="replicate")
    ids, mask = inputs()
    with torch.no_grad():
        out = enc(ids, mask)
    ref = hf_out(model, ids, mask) * mask[..., None]
    assert (out - ref).abs().max() < ATOL
    assert out[2, 7:].abs().max() == 0


def test_sharded_hf_checkpoint_and_bf16(tmp_path):
    model = hf_model(seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    enc = load_t5_encoder(tmp_path)
    ids, mask = inputs()
    with torch.no_grad():
        assert (enc(ids, mask) - hf_out(model, ids, mask)).abs().max() < ATOL
    bf16 = load_t5_encoder(tmp_path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():
        err = (bf16(ids, mask).float() - hf_out(model, ids, mask)).abs().max()
    # bf16 keeps 8 mantissa bits: ~0.4% relative per op on outputs of magnitude <= 4, two layers
    assert err < 0.25


def test_full_umt5_checkpoint_ignores_decoder(tmp_path):
    from transformers import UMT5Config, UMT5Model

    torch.manual_seed(4)
    full = UMT5Model(UMT5Config(**TINY, feed_forward_proj="gated-gelu", attn_implementation="eager")).eval()
    full.save_pretrained(tmp_path)
    enc = load_t5_encoder(tmp_path)
    ids, mask = inputs()
    with torch.no_grad():
        ref = full.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (enc(ids, mask) - ref).abs().max() < ATOL


def test_official_layout_roundtrip_and_wan_dir(hf_dir, tmp_path):
    model, path = hf_dir
    enc = load_t5_encoder(path)
    # a Wan2.1 model directory: the DiT's config.json sits beside the .pth and must be ignored
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"_class_name": "WanModel", "dim": 1536, "num_heads": 12}, f)
    written = save_t5_encoder(enc, tmp_path, layout="official")
    assert written.endswith(OFFICIAL_FILENAME)
    keys = set(torch.load(written, weights_only=True))
    assert {"token_embedding.weight", "blocks.1.pos_embedding.embedding.weight", "blocks.0.ffn.gate.0.weight",
            "blocks.0.attn.o.weight", "blocks.1.norm2.weight", "norm.weight"} <= keys
    for source in (str(tmp_path), written):
        back = load_t5_encoder(source)
        assert back.config == enc.config  # read off the tensor shapes
        ids, mask = inputs()
        with torch.no_grad():
            assert (back(ids, mask) - hf_out(model, ids, mask)).abs().max() < ATOL


def test_our_hf_writer_loads_in_transformers(hf_dir, tmp_path):
    from transformers import UMT5EncoderModel

    model, path = hf_dir
    enc = load_t5_encoder(path)
    save_t5_encoder(enc, tmp_path / "one", layout="hf")
    save_t5_encoder(enc, tmp_path / "many", layout="hf", max_shard_bytes=4000)
    assert os.path.isfile(tmp_path / "many" / "model.safetensors.index.json")
    ids, mask = inputs()
    ref = hf_out(model, ids, mask)
    for sub in ("one", "many"):
        theirs = UMT5EncoderModel.from_pretrained(tmp_path / sub, attn_implementation="eager").eval()
        assert (hf_out(theirs, ids, mask) - ref).abs().max() < ATOL
        with torch.no_grad():
            assert (load_t5_encoder(tmp_path / sub)(ids, mask) - ref).abs().max() < ATOL


def test_missing_and_unexpected_keys(hf_dir, tmp_path):
    _, path = hf_dir
    enc = load_t5_encoder(path)
    state = {file_key(n, "official"): p for n, p in enc.state_dict().items()}
    state.pop("blocks.1.ffn.fc1.weight")
    state["blocks.0.attn.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.1\.ffn\.fc1\.weight\].*blocks\.0\.attn\.extra"):
        load_t5_encoder(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="neither a transformers UMT5 checkpoint"):
        load_t5_encoder(tmp_path)
    cfg_path = os.path.join(path, "config.json")
    wrong = tmp_path / "wrong"
    os.makedirs(wrong)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["d_ff"] = 64
    with open(wrong / "config.json", "w") as f:
        json.dump(cfg, f)
    os.symlink(os.path.join(path, "model.safetensors"), wrong / "model.safetensors")
    with pytest.raises(ValueError, match="has shape"):
        load_t5_encoder(wrong)


def test_shard_load_reads_slices(hf_dir, tmp_path):
    _, path = hf_dir
    full = load_t5_encoder(path)
    cfg = full.config
    official = save_t5_encoder(full, tmp_path, layout="official")
    for rank, source in ((0, path), (1, path), (0, official), (1, official)):
        shard = T5Shard(rank, 2)
        part = load_t5_encoder(source, shard=shard)
        params = dict(part.named_parameters())
        for name, p in full.named_parameters():
            piece = shard.param_slice(name, cfg)
            want = p if piece is None else p.narrow(piece[0], piece[1], piece[2] - piece[1])
            assert torch.equal(params[name], want), name
        assert part.blocks[0].attn.num_heads == 2
        with pytest.raises(ValueError, match="tensor-parallel shard"):
            part.forward_local(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="4 attention heads evenly"):
        T5Shard(0, 3).check(cfg)


def test_umt5_xxl_config():
    cfg = T5Config.umt5_xxl()
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.vocab_size,
            cfg.num_buckets, cfg.max_distance) == (4096, 64, 64, 10240, 24, 256384, 32, 128)


def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "fox": 5, "runs": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def test_tokenizer_from_wan_dir(tmp_path):
    _tiny_tokenizer(tmp_path / "google" / "umt5-xxl")
    tok = load_tokenizer(tmp_path)  # a Wan2.1 model dir keeps it under google/umt5-xxl/
    ids, mask = tokenize(tok, ["a  red\n fox", "a red fox runs runs runs"], text_len=5)
    assert ids.shape == mask.shape == (2, 5) and ids.dtype == torch.long
    assert ids[0].tolist() == [3, 4, 5, 0, 0] and mask[0].tolist() == [1, 1, 1, 0, 0]
    assert mask[1].tolist() == [1] * 5  # truncated to text_len
    assert clean_prompt("  a&amp;b \t c ") == "a&b c"
    with pytest.raises(ValueError, match="never downloaded"):
        load_tokenizer(tmp_path / "nope")


def test_umt5_xxl_budget_and_table(capsys):
    import importlib.util

    from lightx2v_sp.models.t5.budget import comm_bytes, weight_numel

    cfg = T5Config.umt5_xxl()
    d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
    per_layer = 4 * d * inner + cfg.num_buckets * cfg.num_heads + 3 * d * ff + 2 * d
    full = weight_numel(cfg)
    assert full["total"] == cfg.vocab_size * d + cfg.num_layers * per_layer + d == 5_680_910_336
    tp8 = weight_numel(cfg, "tp", 8, 0)
    assert tp8["blocks"] == cfg.num_layers * (per_layer - 2 * d) // 8 + cfg.num_layers * 2 * d
    assert tp8["embedding"] == cfg.vocab_size * d // 8
    # 2 prompts x 512 tokens, bf16, tp N=2: 49 reduce-scatters + 49 all-gathers of 512 x 4096 x 2 bytes
    tp2 = comm_bytes(cfg, "tp", [512, 512], 2, 0)
    assert tp2["bytes"] == {"reduce_scatter": 49 * 512 * d * 2, "all_gather": 49 * 512 * d * 2}
    assert comm_bytes(cfg, "dp", [512, 100], 2, 1)["bytes"] == {"all_gather": 100 * d * 2}
    spec = importlib.util.spec_from_file_location(
        "t5_memory_table", os.path.join(os.path.dirname(__file__), "..", "scripts", "t5_memory_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    table.main([])
    printed = capsys.readouterr().out
    assert "tp N=8" in printed and "5,680,910,336" in printed and "710,289,408" in printed
