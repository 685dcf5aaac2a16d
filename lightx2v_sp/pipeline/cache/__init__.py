"""Step caching (TeaCache, MagCache, first-block cache) beside the sampler loop, deciding the same on
every rank: settings.py (the `cache:` config + the model -> checked settings), policy.py (the per-step
decision and the residual reuse), metrics.py (the sums over the sequence group), published.py (the
published constants and their sources), ratios.py (MagCache ratio files), report.py (the summary)."""
from .policy import StepCache
from .report import cache_summary
from .settings import CacheSettings, dit_dim, resolve_cache


def settings_for_run(cfg, kind, paths):
    """The run's CacheSettings (None: no caching); ValueError before anything loads."""
    return resolve_cache(cfg, kind.name, dit_dim(paths.dit), cfg.model.path)


__all__ = ["CacheSettings", "StepCache", "cache_summary", "resolve_cache", "settings_for_run"]
