"""ftlab's Hydra sweeper plugin (``hydra/sweeper=ftlab_optuna``); the logic is in ftlab.search.

Hydra only instantiates plugins found in the ``hydra_plugins`` namespace package, and imports
every module here on each run, so nothing heavy (optuna, torch) is imported at module level.
"""
