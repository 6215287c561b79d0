"""Pruning methods: metrics, masks, budgets, allocations and the engine that applies them.

Importing the package registers every metric, the meta metric included (its module builds on
``metrics``, so it registers itself here rather than ``metrics`` importing it back).
"""

from prunesearch.pruning import meta_metric, metrics  # noqa: F401  (registration)
