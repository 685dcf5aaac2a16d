"""CLI: generate one video from a YAML config.

    python -m lightx2v_sp.generate --config configs/wan_t2v_tiny.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m lightx2v_sp.generate --config configs/wan_t2v_tiny.yaml parallel.ulysses_degree=2
    python -m lightx2v_sp.generate --config X --help-config   # every key, the value the run would use, its doc
    python -m lightx2v_sp.generate --config X --plan [--gpus N] [--gpu-memory GiB]   # memory plan, no loading
    python -m lightx2v_sp.generate --config X --dry-run [--gpus N] [--gpu-memory GiB]  # real shapes, no weights
    python -m lightx2v_sp.generate --config X --prompts prompts.txt   # load once, one video per line (serve/batch.py)

The same command runs as one process or under torchrun (one node or several). User errors
(bad key or value, a layout that does not fit, a missing model, an unwritable output) print one
`error: ...` line on rank 0 and exit with status 2 on every rank; no video is written. A lost
peer (dead or stopped rank) is one `[rank r] error: lost a peer rank ...` line and status 1;
SIGTERM / SIGINT remove the temporary file and exit with 128 + the signal number.
`--plan` prints the memory plan (lightx2v_sp/plan.py) and exits 0 when every rank fits, 3 when not.
`--dry-run` runs everything up to reading weights at the checkpoint's real shapes on the meta device
(lightx2v_sp/dryrun.py): the same exit codes, one `error:` line for the first check that fails.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
EXIT_DOES_NOT_FIT = 3


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _default_config() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "configs", "wan_t2v_tiny.yaml")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, on rank 0 only, like every other user error
        if _env_rank() == 0:
            print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lightx2v_sp.generate",
                description="Generate a video with a Wan2.1 DiT (Ulysses sequence parallel under torchrun).")
    p.add_argument("--config", default=None,
                   help="YAML config (default: configs/wan_t2v_tiny.yaml, the embedded tiny model)")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key with the value this --config and these overrides give it, and exit")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan per rank and stage (no weights loaded) and whether it fits; exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything a run does up to reading weights, at the model's real shapes on the meta "
                        "device (configs only, no GPU), print what was checked and the memory plan; exit")
    p.add_argument("--gpus", type=int, default=None,
                   help="ranks the plan and the dry run assume (default: WORLD_SIZE or 1)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                   help="GPU memory per rank the plan checks against (default: free memory of this GPU, "
                        "else 24 GiB)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="load once, then one video per prompt: a text file (one prompt a line) or .jsonl (one job "
                        "a line: prompt, negative_prompt, seed, image, output, steps, guidance_scale, size, "
                        "num_frames, ...); bad items are reported and skipped, finished ones skipped on a rerun")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. parallel.ulysses_degree=2 sample.steps=10")
    return p


class _TqdmHandler(logging.StreamHandler):
    """Log lines above the denoise progress bar instead of inside it (tqdm.write redraws the bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never fail the run
            self.handleError(record)


def _setup_logging(rank: int) -> None:
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[lightx2v_sp] %(message)s"))
    log = logging.getLogger("lightx2v_sp")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    if rank != 0:  # library chatter from rank 0 only
        warnings.filterwarnings("ignore")
        for name in ("transformers", "diffusers"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _fail(message: str, code: int, hard: bool) -> int:
    """Report on stderr; `hard` exits at once (peers may sit in a collective: no teardown)."""
    if message:
        print(message, file=sys.stderr, flush=True)
    if hard:
        sys.stdout.flush()
        os._exit(code)
    return code


def main(argv=None) -> int:
    rank = _env_rank()
    _setup_logging(rank)
    args = _parser().parse_args(argv)
    from lightx2v_sp.config import describe, load_config
    from lightx2v_sp.distributed import resolve_device

    # Config errors are the same on every rank (same files, same arguments): no collective needed.
    try:
        path = args.config or _default_config()
        cfg = load_config(path, args.overrides)
        if args.help_config:  # the values this command line would run with
            if rank == 0:
                print(f"# {path} {' '.join(args.overrides)}".rstrip() + ": the values a run would use")
                print(describe(cfg))
            return 0
        device = resolve_device(cfg.device)
    except ValueError as e:
        return _fail(f"error: {e}", EXIT_USER_ERROR, hard=False) if rank == 0 else EXIT_USER_ERROR

    if args.plan:
        from lightx2v_sp.plan import main_plan

        try:
            text, ok = main_plan(cfg, args.gpus, args.gpu_memory)
        except ValueError as e:
            return _fail(f"error: {e}", EXIT_USER_ERROR, hard=False) if rank == 0 else EXIT_USER_ERROR
        if rank == 0:
            print(text)
        return 0 if ok else EXIT_DOES_NOT_FIT

    if args.dry_run:
        from lightx2v_sp.dryrun import main_dry_run

        try:
            text, ok = main_dry_run(cfg, args.gpus, args.gpu_memory, name=os.path.basename(path))
        except ValueError as e:
            return _fail(f"error: {e}", EXIT_USER_ERROR, hard=False) if rank == 0 else EXIT_USER_ERROR
        if rank == 0:
            print(text)
        if not ok:
            return _fail("error: a rank does not fit the GPU memory (the plan above); python -m lightx2v_sp.generate "
                         "--plan shows what to change", EXIT_DOES_NOT_FIT, hard=False)
        return 0

    from lightx2v_sp.pipeline import run

    if args.prompts is not None:
        from lightx2v_sp.serve.batch import run_prompt_file

        return run_reporting(cfg, device, lambda: run_prompt_file(cfg, device, args.prompts))
    return run_reporting(cfg, device, lambda: run(cfg, device))


def run_reporting(cfg, device, body, terminate=None) -> int:
    """Join the process group, run `body()` and turn what it raises into one line and an exit status
    (its own return value when it returns an int). `terminate`: the SIGTERM context (default: raise)."""
    from lightx2v_sp.distributed import init_distributed, shutdown_distributed
    from lightx2v_sp.distributed.peer_lost import PeerLostError, is_peer_lost
    from lightx2v_sp.pipeline import AgreedError
    from lightx2v_sp.signals import Terminated, terminate_raises

    rank = _env_rank()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {rank}] " if world > 1 else ""
    try:
        with (terminate or terminate_raises)():
            init_distributed(device, cfg.comm.timeout_s)
            code = body()
    except AgreedError as e:  # every rank raised it together: clean teardown is safe
        if rank == 0:  # report before teardown: torchrun may SIGTERM us once a peer has exited
            print(f"error: {e}", file=sys.stderr, flush=True)
        shutdown_distributed()
        return EXIT_FAILURE if e.internal else EXIT_USER_ERROR
    except ValueError as e:  # one rank only, maybe: say which, and do not wait for the others
        return _fail(f"{prefix}error: {e}", EXIT_USER_ERROR, hard=world > 1)
    except (KeyboardInterrupt, Terminated) as e:
        # on ranks > 0 this is mostly torchrun's teardown after a peer's own report: stay quiet
        name = "SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
        signum = 2 if isinstance(e, KeyboardInterrupt) else e.signum
        message = f"{prefix}error: interrupted by {name}; no video was written" if rank == 0 else ""
        return _fail(message, 128 + signum, hard=world > 1)
    except Exception as e:  # noqa: BLE001
        if isinstance(e, PeerLostError):  # our own report of a silent rank 0
            return _fail(f"{prefix}error: {e}; no video was written", EXIT_FAILURE, hard=world > 1)
        if is_peer_lost(e):  # a dead or stopped peer: one line, the traceback says nothing more
            first = str(e).splitlines()[0] if str(e) else ""
            return _fail(f"{prefix}error: lost a peer rank ({type(e).__name__}: {first}); a rank died or "
                         f"hung longer than comm.timeout_s={cfg.comm.timeout_s}; no video was written",
                         EXIT_FAILURE, hard=world > 1)
        # a bug: the traceback is the useful report
        traceback.print_exc()
        return _fail(f"[rank {rank}] error: the run failed (traceback above)", EXIT_FAILURE, hard=world > 1)
    shutdown_distributed()
    return code if isinstance(code, int) else 0


# tools that write their results at the interpreter's exit and may hook in by other means than
# sys.settrace / sys.setprofile / sys.monitoring: with one of them loaded, exit normally. Not cProfile
# or profile: torch._dynamo imports them (so any run has them loaded); they are seen when active.
_EXIT_HOOKED_TOOLS = ("coverage", "pyinstrument", "yappi", "line_profiler", "memray")


def _watched() -> bool:
    """Whether a profiler, tracer, debugger or coverage tool is watching this process."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)  # 3.12+: cProfile and coverage may use it instead
    if monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in
                                      (monitoring.PROFILER_ID, monitoring.COVERAGE_ID, monitoring.DEBUGGER_ID)):
        return True
    return any(name in sys.modules for name in _EXIT_HOOKED_TOOLS)


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown. The outputs are committed and the process
    group is gone by then; what is left is freeing the CUDA context and the caching allocator's pools
    and unloading thousands of modules: seconds (3.3 s measured on one H100 at 1.3B 480p) that a user
    waited for after the video was written. Not under a profiler, a coverage tool or a tracer (they
    write their results at exit), nor with LIGHTX2V_SP_FAST_EXIT=0."""
    if os.environ.get("LIGHTX2V_SP_FAST_EXIT", "1") == "0" or _watched():
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):  # None when the process started with the descriptor closed
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
