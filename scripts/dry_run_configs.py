"""Dry-run every shipped config at its real shapes and print the table of the README and CI.

    HF_HUB_OFFLINE=1 HF_HUB_CACHE=tests/fixtures/hub python scripts/dry_run_configs.py [configs/*.yaml]

Each config runs at its intended world size (cfg_degree x ulysses_degree; 8 for *_8gpu / *_4090x8)
against the card it is written for (24 GiB for *_4090x8 and its variants such as *_4090x8_offload, 80 GiB for the others), in one process,
on the meta device (lightx2v_sp/dryrun.py). The distill configs name a LoRA the user sets; the
stand-in here is tests/fixtures/loras (zeros at the shapes of a Wan2.1-T2V-14B LoRA).
Exits 1 when a config fails its dry run or does not fit its card.
"""
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lightx2v_sp.dryrun import check_configs, format_rows  # noqa: E402

SHAPES_LORA = os.path.join(ROOT, "tests", "fixtures", "loras", "wan21_t2v_14b_shapes_lora.safetensors")


def main() -> int:
    paths = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    try:
        rows = check_configs(paths, lambda name: [f"lora.0.path={SHAPES_LORA}"] if "distill" in name else [])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_rows(rows))
    return 0 if all(r[4] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
