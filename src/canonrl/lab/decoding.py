"""Incremental decoders for the sampling loop: one forward per new token, with a KV cache.

`LlamaDecoder` serves Llama-architecture models (lab-tiny, SmolLM2): a preallocated cache written in place (no
per-step concatenation), the layers' own projections, norms, MLPs and rotary embedding called directly (no
per-step mask construction, output dataclasses or cache bookkeeping), and `keep(rows)` to drop finished rows, so
a step costs what its live rows cost. `HFDecoder` serves every other causal LM through its forward with a
`DynamicCache`; it does not drop rows. Both run the prompt (prefill) through the model's own forward.

For a model of a few million parameters a decode step is dominated by this per-step overhead, not arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts nothing: the first real token is at position 0 in every row."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def prompt_confidence_from_logits(
    logits: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> torch.Tensor:
    """[N] exp(mean over prompt tokens of log p(token | earlier prompt tokens)), in (0, 1], from a prompt
    forward's logits [N, P, V] at temperature 1 (ProGRPO's prompt confidence).

    The first real token of a row (BOS for the lab tokenizer; the chat template's first token otherwise) has no
    prediction and is left out, as is left padding: the mean runs over the row's other tokens. A row with a
    single real token gets 1.0.
    """
    scored = prompt_mask[:, :-1].bool() & prompt_mask[:, 1:].bool()  # [N, P - 1]: both token and context real
    count = scored.sum(dim=1)
    context = logits[:, :-1].float()
    picked = context.gather(-1, prompt_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    token_logprobs = picked - torch.logsumexp(context, dim=-1)  # log_softmax at the prompt's own next token
    totals = torch.where(scored, token_logprobs, 0.0).sum(dim=1)
    mean = totals / count.clamp(min=1)
    # exp of a very negative mean would underflow to 0, outside (0, 1]
    confidence = mean.exp().clamp(min=torch.finfo(torch.float32).tiny, max=1.0)
    return torch.where(count > 0, confidence, torch.ones_like(confidence))


class HFDecoder:
    """Any causal LM: its forward with a DynamicCache; rows are never dropped."""

    can_drop_rows = False

    def __init__(
        self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, repeats: int = 1,
        score_prompt: bool = False,
    ):  # fmt: skip
        from transformers import DynamicCache

        self.model = model
        distinct_ids, distinct_mask = prompt_ids, prompt_mask
        prompt_ids = prompt_ids.repeat_interleave(repeats, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(repeats, dim=0)
        self.attention = prompt_mask.clone()
        positions = positions_from_mask(self.attention)
        out = model(
            input_ids=prompt_ids, attention_mask=self.attention, position_ids=positions,
            past_key_values=DynamicCache(), use_cache=True,
        )  # fmt: skip
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :]
        self.next_position = positions[:, -1:] + 1
        #: [N] per distinct prompt, when `score_prompt` (see `prompt_confidence_from_logits`)
        self.prompt_confidence = (
            prompt_confidence_from_logits(out.logits[::repeats], distinct_ids, distinct_mask) if score_prompt else None
        )

    def step(self, tokens: torch.Tensor, alive: torch.Tensor) -> None:
        self.attention = torch.cat([self.attention, alive.long().unsqueeze(1)], dim=1)
        out = self.model(
            input_ids=tokens.unsqueeze(1), attention_mask=self.attention, position_ids=self.next_position,
            past_key_values=self.cache, use_cache=True,
        )  # fmt: skip
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :]
        self.next_position = self.next_position + alive.long().unsqueeze(1)  # a hole takes no position


class _FusedLayer:
    """One decoder layer's weights arranged for single-token steps: q|k|v and gate|up as one matmul each."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        self.qkv_bias = torch.cat(biases) if biases[0] is not None else None
        self.o_proj = attn.o_proj
        self.gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]) if mlp.gate_proj.bias is not None else None
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.scaling = attn.scaling
        self.input_norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.post_norm = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)


def _rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    weight, eps = norm
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecoder:
    """Llama-architecture decoding with a preallocated, compactable KV cache and fused projections."""

    can_drop_rows = True

    @staticmethod
    def supports(model) -> bool:
        config = getattr(model, "config", None)
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        return (
            getattr(config, "model_type", None) == "llama"
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and rotary is not None
            # these RoPE types change with the sequence length; the position table below assumes they don't
            and getattr(rotary, "rope_type", "default") not in ("dynamic", "longrope")
            and next(model.parameters()).dtype == torch.float32
        )

    def __init__(
        self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, repeats: int = 1,
        score_prompt: bool = False,
    ):  # fmt: skip
        """Prefill each distinct prompt once, then give each of its `repeats` rows a copy of its cache.

        With `score_prompt`, the prefill's logits also give each prompt's confidence (`prompt_confidence`).
        """
        from transformers import DynamicCache

        self.model = model
        config = model.config
        rows, prompt_len = prompt_ids.shape[0] * repeats, prompt_ids.shape[1]
        capacity = prompt_len + max_new_tokens
        positions = positions_from_mask(prompt_mask)
        out = model(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
            past_key_values=DynamicCache(), use_cache=True,
        )  # fmt: skip
        #: [N] per distinct prompt, when `score_prompt` (see `prompt_confidence_from_logits`)
        self.prompt_confidence = (
            prompt_confidence_from_logits(out.logits, prompt_ids, prompt_mask) if score_prompt else None
        )
        # the cache as [rows * kv_heads, capacity, head_dim]: a single-token query is then one batched matmul
        self.keys, self.values = [], []
        for layer_cache in out.past_key_values.layers:
            for source, target in ((layer_cache.keys, self.keys), (layer_cache.values, self.values)):
                kv_heads, head_dim = source.shape[1], source.shape[3]
                # uninitialised is safe: position t is written for every row before any row reads it
                cache = source.new_empty(rows * kv_heads, capacity, head_dim)
                cache[:, :prompt_len] = source.repeat_interleave(repeats, dim=0).reshape(rows * kv_heads, prompt_len, head_dim)
                target.append(cache)
        self.layers = [_FusedLayer(layer) for layer in model.model.layers]
        # additive attention bias: 0 where a row attends, -inf on its padding
        self.bias = out.logits.new_zeros(rows, capacity, dtype=torch.float32)
        self.bias[:, :prompt_len].masked_fill_(~prompt_mask.bool().repeat_interleave(repeats, dim=0), float("-inf"))
        self.length = prompt_len
        self.logits = out.logits[:, -1, :].repeat_interleave(repeats, dim=0)
        self.next_position = (positions[:, -1] + 1).repeat_interleave(repeats, dim=0)
        table_positions = torch.arange(capacity + 1, device=prompt_ids.device).unsqueeze(0)
        cos, sin = model.model.rotary_emb(out.logits.new_zeros(1, 1, 1), table_positions)
        self.cos_table, self.sin_table = cos[0], sin[0]  # [capacity + 1, head_dim]
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.final_norm = (model.model.norm.weight, model.model.norm.variance_epsilon)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (indices into the current rows)."""
        cache_rows = (rows.unsqueeze(1) * self.kv_heads + torch.arange(self.kv_heads, device=rows.device)).flatten()
        self.keys = [k.index_select(0, cache_rows) for k in self.keys]
        self.values = [v.index_select(0, cache_rows) for v in self.values]
        self.bias = self.bias.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows)

    def step(self, tokens: torch.Tensor, alive: torch.Tensor) -> None:
        rows = tokens.shape[0]
        t = self.length
        q_heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        groups = q_heads // kv_heads  # query heads per KV head, in order (as transformers' repeat_kv)
        self.bias[:, t] = torch.where(alive, 0.0, float("-inf"))
        bias = self.bias[:, : t + 1].repeat_interleave(kv_heads, dim=0).unsqueeze(1)  # [rows * kv_heads, 1, t + 1]
        cos = self.cos_table[self.next_position].unsqueeze(1)  # [rows, 1, head_dim]
        sin = self.sin_table[self.next_position].unsqueeze(1)
        hidden = self.model.model.embed_tokens(tokens)  # [rows, hidden]
        for index, layer in enumerate(self.layers):
            qkv = F.linear(_rms_norm(hidden, layer.input_norm), layer.qkv_weight, layer.qkv_bias)
            qkv = qkv.view(rows, q_heads + 2 * kv_heads, head_dim)
            qk = qkv[:, : q_heads + kv_heads]
            qk = qk * cos + _rotate_half(qk) * sin
            queries = qk[:, :q_heads].reshape(rows * kv_heads, groups, head_dim)
            keys, values = self.keys[index], self.values[index]
            keys[:, t] = qk[:, q_heads:].reshape(rows * kv_heads, head_dim)
            values[:, t] = qkv[:, q_heads + kv_heads :].reshape(rows * kv_heads, head_dim)
            scores = torch.baddbmm(bias, queries, keys[:, : t + 1].transpose(1, 2), alpha=layer.scaling)
            context = torch.bmm(scores.softmax(dim=-1), values[:, : t + 1])  # [rows * kv_heads, groups, head_dim]
            hidden = hidden + layer.o_proj(context.reshape(rows, q_heads * head_dim))
            gate, up = F.linear(_rms_norm(hidden, layer.post_norm), layer.gate_up_weight, layer.gate_up_bias).chunk(2, dim=-1)
            hidden = hidden + layer.down_proj(layer.act_fn(gate) * up)
        self.logits = self.model.lm_head(_rms_norm(hidden, self.final_norm))
        self.length = t + 1
        self.next_position = self.next_position + alive.long()  # a hole (a row waiting for others) takes no position


def make_decoder(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, repeats: int = 1,
    score_prompt: bool = False,
):  # fmt: skip
    """A decoder over `repeats` rows per prompt row (in `repeat_interleave` order), prefilled.

    With `score_prompt` its `prompt_confidence` holds each prompt row's confidence, read off the prefill's logits.
    """
    cls = LlamaDecoder if LlamaDecoder.supports(model) else HFDecoder
    return cls(model, prompt_ids, prompt_mask, max_new_tokens, repeats, score_prompt=score_prompt)
