"""Producers: the model-pass side of canonrl.

An estimator documents the batch fields it reads (``canonrl.fields.FIELDS``); a producer computes such a field from
what a model pass gives (hidden states, logits) and a response mask. Producers import torch only: no model, no
trainer, no tokenizer.
"""
