"""Adapters that plug canonrl's estimators into RL trainers (``canonrl.integrations.verl``).

Nothing here is imported by ``import canonrl``; each adapter imports its framework lazily.
"""
