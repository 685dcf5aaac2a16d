"""Hugging Face repo ids as model paths: `model.path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers`.

A value that is not a local path and reads `org/name` (components also `org/name/subfolder`) is
resolved with `huggingface_hub.snapshot_download` into the standard hub cache
(`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), fetching only the files the
loaders read (ALLOW_PATTERNS), at `model.revision` (branch, tag or commit; default main). A whole
model's top-level configs come first, so a checkpoint that would be refused (official-layout Wan2.1
I2V or TI2V: kind.unsupported_official) is refused before its weights are downloaded.

Once per node: the local ranks of a job take an exclusive file lock in the cache; the first one
downloads and stamps the lock file with its job and the commit it got, the others wait on the lock
and then resolve that commit from the cache without the network. A file lock, not a collective:
a download may take longer than any collective timeout, and a rank that failed earlier in the
preflight must not leave the others in a barrier. `HF_HUB_OFFLINE=1`: cache only, no lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from typing import Callable, Iterator, Optional, Sequence

log = logging.getLogger("lightx2v_sp")

# What the loaders read, for both released layouts (and the Wan2.2 / I2V components): a Wan
# repo also holds example videos, assets and, in the official layout, files no loader opens.
ALLOW_PATTERNS = (
    # diffusers layout (Wan-AI/Wan2.*-Diffusers)
    "model_index.json", "transformer/*", "transformer_2/*", "text_encoder/*", "tokenizer/*", "vae/*",
    "image_encoder/*", "image_processor/*",
    # official layout (Wan-AI/Wan2.1-T2V-*, Wan2.2-*); not the official I2V's open_clip .pth nor
    # TI2V's Wan2.2_VAE.pth, which no loader reads (those checkpoints are refused: kind.py)
    "config.json", "diffusion_pytorch_model*.safetensors*", "models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1_VAE.pth", "google/umt5-xxl/*", "high_noise_model/*", "low_noise_model/*",
)
# Fetched first for a whole model: enough to refuse a checkpoint before its weights are downloaded.
PRECHECK_PATTERNS = ("config.json", "model_index.json")
# A component given as a repo of its own (no subfolder), e.g. tokenizer_path=google/umt5-xxl.
COMPONENT_PATTERNS = {
    "text_encoder": ("config.json", "model*.safetensors*", "models_t5*.pth"),
    "tokenizer": ("*.json", "*.model", "*.txt"),
    "vae": ("config.json", "diffusion_pytorch_model*.safetensors*", "*VAE*.pth"),
}

# What the memory plan and the dry run read (configs_only): every config file of both layouts, no weights
# (fnmatch: `*` also matches `/`, so these reach config.json in every subfolder).
CONFIG_PATTERNS = ("model_index.json", "*config.json")
COMPONENT_CONFIG_PATTERNS = {"text_encoder": ("config.json",), "tokenizer": ("*config.json",), "vae": ("config.json",)}

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_REPO_ID = re.compile(rf"^({_NAME}/{_NAME})(/[^\s]+)?$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() in (
        "1", "ON", "YES", "TRUE")


def hub_cache_dir() -> str:
    """The cache huggingface_hub uses, read from the environment now (not at its import)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.abspath(os.path.expandvars(os.path.expanduser(explicit)))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                               "huggingface")
    return os.path.abspath(os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub"))


def split_repo_id(value: str, allow_subfolder: bool = False) -> Optional[tuple[str, str]]:
    """(repo_id, subfolder) when `value` is no local path and reads org/name[/subfolder]; else None."""
    if value is None or os.path.exists(os.path.expanduser(value)) or value.startswith((".", "~", "/")):
        return None
    m = _REPO_ID.match(value)
    if m is None or ".." in value or "--" in m.group(1) or (m.group(2) and not allow_subfolder):
        return None
    return m.group(1), (m.group(2) or "").strip("/")


def _job_key() -> Optional[str]:
    """Same string on the local ranks of one torchrun launch (they share the agent as parent)."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return None
    return ":".join([os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(os.getppid())])


@contextlib.contextmanager
def _node_lock(cache: str, repo_id: str) -> Iterator:
    lock_dir = os.path.join(cache, ".locks", "lightx2v_sp")
    try:
        os.makedirs(lock_dir, exist_ok=True)
        f = open(os.path.join(lock_dir, "models--" + repo_id.replace("/", "--") + ".lock"), "a+")
    except OSError as e:
        raise ValueError(f"cannot write to the Hugging Face cache {cache} ({e.strerror}); set HF_HUB_CACHE "
                         "(or HF_HOME) to a writable directory, or download the model and set model.path to "
                         "its directory") from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _download(repo_id: str, revision: Optional[str], patterns: Sequence[str], cache: str,
              local_files_only: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    rev = revision or "main"
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=list(patterns),
                                 local_files_only=local_files_only)
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if _offline() else
               f"the Hub could not be reached ({str(e).splitlines()[0][:200]})")
        raise ValueError(f"{repo_id!r} is not a local directory, so it was taken as a Hugging Face repo id, but "
                         f"the cache {cache} holds no complete copy of it (revision {rev}) and {why}. Download it "
                         f"where the Hub is reachable (`hf download {repo_id}` with HF_HUB_CACHE={cache}), or "
                         "point the path at a local directory; nothing was loaded") from None
    except RevisionNotFoundError:
        raise ValueError(f"model.revision={rev!r} does not exist in the Hugging Face repo {repo_id!r}; use a "
                         "branch, tag or commit of that repo (or null for main)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id!r} is not a local directory and not a Hugging Face repo this machine can "
                         "read (missing, private or gated: log in with `hf auth login`); check the path or "
                         "id") from None
    except (HfHubHTTPError, OSError) as e:
        raise ValueError(f"could not download {repo_id!r} (revision {rev}) into {cache}: "
                         f"{str(e).splitlines()[0][:300]}") from None


def resolve_repo(repo_id: str, revision: Optional[str] = None, patterns: Sequence[str] = ALLOW_PATTERNS,
                 precheck: Optional[Callable[[str], None]] = None) -> str:
    """Local snapshot directory of `repo_id` at `revision`, downloaded once per node if needed.

    `precheck(snapshot)` (raises ValueError to refuse) runs on the repo's top-level configs
    (PRECHECK_PATTERNS) before anything else is downloaded, and the rest is then fetched at the commit
    those came from, so a checkpoint that would be refused costs two small files, not its weights.
    """
    cache = hub_cache_dir()
    if _offline():
        path = _download(repo_id, revision, patterns, cache, local_files_only=True)
        if precheck is not None:
            precheck(path)
        return path
    job = _job_key()
    want = {"job": job, "repo_id": repo_id, "revision": revision, "patterns": list(patterns)}
    with _node_lock(cache, repo_id) as lock:
        lock.seek(0)
        try:
            stamp = json.loads(lock.read() or "{}")
        except ValueError:
            stamp = {}
        if job is not None and {k: stamp.get(k) for k in want} == want and os.path.isdir(stamp.get("path", "")):
            # a local peer of this launch has just downloaded it: same commit, from the cache
            return _download(repo_id, stamp["commit"], patterns, cache, local_files_only=True)
        commit = revision
        if precheck is not None:
            configs = _download(repo_id, revision, PRECHECK_PATTERNS, cache, local_files_only=False)
            precheck(configs)
            commit = os.path.basename(os.path.normpath(configs))  # the snapshot directory is the commit
        log.info("fetching %s (revision %s) into %s: only the files the loaders read", repo_id,
                 revision or "main", cache)
        path = _download(repo_id, commit, patterns, cache, local_files_only=False)
        lock.seek(0)
        lock.truncate()
        lock.write(json.dumps({**want, "commit": os.path.basename(os.path.normpath(path)), "path": path}))
        lock.flush()
    return path


def resolve_path(value: Optional[str], what: str, revision: Optional[str] = None,
                 main_repo: Optional[str] = None, configs_only: bool = False,
                 precheck: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """`value` itself, or the local directory of the repo id (+ subfolder) it names.

    `what`: "model" (the whole model: ALLOW_PATTERNS) or a key of COMPONENT_PATTERNS. `revision`
    applies to the model's own repo, and to a component taken from that same repo. `configs_only`:
    fetch only the config files (CONFIG_PATTERNS), for what needs shapes and no weights. `precheck`: see
    resolve_repo.
    """
    parsed = split_repo_id(value, allow_subfolder=what != "model") if value is not None else None
    if parsed is None:
        return value
    repo_id, sub = parsed
    if sub:
        patterns: Sequence[str] = (f"{sub}/*config.json",) if configs_only else (sub, f"{sub}/*")
    elif what == "model":
        patterns = CONFIG_PATTERNS if configs_only else ALLOW_PATTERNS
    else:
        patterns = (COMPONENT_CONFIG_PATTERNS if configs_only else COMPONENT_PATTERNS)[what]
    rev = revision if what == "model" or repo_id == main_repo else None
    root = resolve_repo(repo_id, rev, patterns, precheck)
    return os.path.join(root, sub) if sub else root
