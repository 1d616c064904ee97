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


class HFDecoder:
    """Any causal LM: its forward with a DynamicCache; rows are never dropped."""

    can_drop_rows = False

    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
        from transformers import DynamicCache

        self.model = model
        self.attention = prompt_mask.clone()
        positions = positions_from_mask(self.attention)
        out = model(
            input_ids=prompt_ids, attention_mask=self.attention, position_ids=positions,
            past_key_values=DynamicCache(), use_cache=True,
        )  # fmt: skip
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :]
        self.next_position = positions[:, -1:] + 1

    def step(self, tokens: torch.Tensor, alive: torch.Tensor) -> None:
        self.attention = torch.cat([self.attention, alive.long().unsqueeze(1)], dim=1)
        out = self.model(
            input_ids=tokens.unsqueeze(1), attention_mask=self.attention, position_ids=self.next_position,
            past_key_values=self.cache, use_cache=True,
        )  # fmt: skip
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :]
        self.next_position = self.next_position + 1


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

    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
        from transformers import DynamicCache

        self.model = model
        config = model.config
        rows, prompt_len = prompt_ids.shape
        capacity = prompt_len + max_new_tokens
        positions = positions_from_mask(prompt_mask)
        out = model(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
            past_key_values=DynamicCache(), use_cache=True,
        )  # fmt: skip
        self.keys, self.values = [], []
        for layer_cache in out.past_key_values.layers:
            keys, values = layer_cache.keys, layer_cache.values  # [rows, kv_heads, prompt_len, head_dim]
            k = keys.new_zeros(rows, keys.shape[1], capacity, keys.shape[3])
            v = values.new_zeros(rows, values.shape[1], capacity, values.shape[3])
            k[:, :, :prompt_len] = keys
            v[:, :, :prompt_len] = values
            self.keys.append(k)
            self.values.append(v)
        self.layers = [_FusedLayer(layer) for layer in model.model.layers]
        self.attend = torch.zeros(rows, capacity, dtype=torch.bool, device=prompt_ids.device)
        self.attend[:, :prompt_len] = prompt_mask.bool()
        self.length = prompt_len
        self.logits = out.logits[:, -1, :]
        self.next_position = positions[:, -1] + 1
        table_positions = torch.arange(capacity + 1, device=prompt_ids.device).unsqueeze(0)
        cos, sin = model.model.rotary_emb(out.logits.new_zeros(1, 1, 1), table_positions)
        self.cos_table, self.sin_table = cos[0], sin[0]  # [capacity + 1, head_dim]
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.final_norm = (model.model.norm.weight, model.model.norm.variance_epsilon)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (indices into the current rows)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.attend = self.attend.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows)

    def step(self, tokens: torch.Tensor, alive: torch.Tensor) -> None:
        rows = tokens.shape[0]
        t = self.length
        self.attend[:, t] = alive
        mask = self.attend[:, None, None, : t + 1]
        cos = self.cos_table[self.next_position][:, None, None, :]  # [rows, 1, 1, head_dim]
        sin = self.sin_table[self.next_position][:, None, None, :]
        q_heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        hidden = self.model.model.embed_tokens(tokens)  # [rows, hidden]
        for index, layer in enumerate(self.layers):
            qkv = F.linear(_rms_norm(hidden, layer.input_norm), layer.qkv_weight, layer.qkv_bias)
            qkv = qkv.view(rows, q_heads + 2 * kv_heads, 1, head_dim)
            qk = qkv[:, : q_heads + kv_heads]
            qk = qk * cos + _rotate_half(qk) * sin
            q, k, v = qk[:, :q_heads], qk[:, q_heads:], qkv[:, q_heads + kv_heads :]
            self.keys[index][:, :, t : t + 1] = k
            self.values[index][:, :, t : t + 1] = v
            context = F.scaled_dot_product_attention(
                q, self.keys[index][:, :, : t + 1], self.values[index][:, :, : t + 1],
                attn_mask=mask, scale=layer.scaling, enable_gqa=kv_heads != q_heads,
            )  # fmt: skip
            hidden = hidden + layer.o_proj(context.reshape(rows, -1))
            gate, up = F.linear(_rms_norm(hidden, layer.post_norm), layer.gate_up_weight, layer.gate_up_bias).chunk(2, dim=-1)
            hidden = hidden + layer.down_proj(layer.act_fn(gate) * up)
        self.logits = self.model.lm_head(_rms_norm(hidden, self.final_norm))
        self.length = t + 1
        self.next_position = self.next_position + 1


def make_decoder(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
    cls = LlamaDecoder if LlamaDecoder.supports(model) else HFDecoder
    return cls(model, prompt_ids, prompt_mask, max_new_tokens)
