"""Straightforward loop implementations of the specs: test oracles and benchmark contenders, never hot paths."""
