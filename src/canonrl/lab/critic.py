"""The lab's critic: token values for the critic estimators (GAE, SAE), trained on their value targets.

``critic=head``: a value head (a two-layer MLP) on the policy's last hidden state. The hidden states are read once
per step, without grad, under the policy that sampled (`canonrl.lab.forward.response_hidden`); the head trains on
them for ``critic_epochs`` passes, so a step's critic costs one forward and no backward through the policy, and the
policy's gradient stays the estimator's alone (the head does not share the policy's loss, unlike PPO with a shared
trunk and a value coefficient).

``critic=separate``: a separate model — a copy of the initial policy, with the same head on its last hidden state —
trained end to end with its own AdamW for ``critic_epochs`` passes over each step's rows in micro-batches (verl's
separate critic worker, in miniature). It costs a forward per step for the values and a forward and backward per
epoch for the update.

Either way a token's value is read at the hidden state it was sampled from (verl's alignment: the value of response
token t is the critic's output at position t - 1), the values of a step are recorded before its update (the clipped
loss's old values), and the loss is verl's clipped value loss (`canonrl.training.value_loss`) against the
estimator's ``returns`` (``compute_with_returns``), token-mean over the response mask. ``critic_warmup`` steps train
the critic alone before the policy's first update (VC-PPO's value pretraining).

Every random draw (the head's initialisation, the minibatch order) comes from generators seeded by (seed, purpose,
step), and `state_dict` holds the head, the separate model and the optimizer, so resume stays bit-exact.
"""

from __future__ import annotations

import torch
from torch import nn

from canonrl.lab.forward import micro_batches, response_hidden
from canonrl.lab.sampling import Rollouts
from canonrl.lab.seeds import seed_of
from canonrl.training.value_loss import clipped_value_loss

CRITICS = ("none", "head", "separate")
#: the default learning rate of each kind (`critic_lr` null)
DEFAULT_LR = {"head": 1e-3, "separate": 1e-4}
HEAD_WIDTH = 128


class ValueHead(nn.Module):
    """hidden [..., H] -> value [...]: Linear, tanh, Linear; its last layer starts at 0 (every value 0 at first)."""

    def __init__(self, hidden_size: int, generator: torch.Generator):
        super().__init__()
        self.hidden = nn.Linear(hidden_size, HEAD_WIDTH)
        self.out = nn.Linear(HEAD_WIDTH, 1)
        with torch.no_grad():
            bound = hidden_size**-0.5
            self.hidden.weight.copy_(torch.empty_like(self.hidden.weight).uniform_(-bound, bound, generator=generator))
            self.hidden.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(hidden))).squeeze(-1)


class Critic:
    """`values` before a step's update, `update` after it; see the module docstring."""

    def __init__(self, kind: str, policy_model, *, seed: int, lr: float | None, epochs: int, clip: float,
                 micro_batch_size: int, separate_model=None):  # fmt: skip
        if kind not in ("head", "separate"):
            raise ValueError(f"critic must be one of {', '.join(CRITICS[1:])}, got {kind!r}")
        if (kind == "separate") != (separate_model is not None):
            raise ValueError("critic='separate' needs its own model, and only it")
        self.kind, self.epochs, self.clip, self.micro_batch_size, self.seed = kind, epochs, clip, micro_batch_size, seed
        self.policy_model = policy_model
        self.model = separate_model
        trunk = separate_model if separate_model is not None else policy_model
        device = next(trunk.parameters()).device
        generator = torch.Generator().manual_seed(seed_of(seed, "value_head"))
        self.head = ValueHead(trunk.config.hidden_size, generator).to(device)
        parameters = list(self.head.parameters()) + (list(separate_model.parameters()) if separate_model is not None else [])
        self.optimizer = torch.optim.AdamW(parameters, lr=lr or DEFAULT_LR[kind], weight_decay=0.0)
        self._features: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config, policy, load_model) -> Critic | None:
        """The configured critic (None for ``critic=none``); `load_model()` gives a fresh copy of the initial policy."""
        if config.critic == "none":
            return None
        model = load_model() if config.critic == "separate" else None
        if model is not None:
            model.train()
        return cls(config.critic, policy.model, seed=config.seed, lr=config.critic_lr, epochs=config.critic_epochs,
                   clip=config.value_clip, micro_batch_size=config.micro_batch_size, separate_model=model)  # fmt: skip

    def _hidden(self, model, rollouts: Rollouts) -> torch.Tensor:
        """[B, T, H] the last hidden state before each response token, in micro-batches of similar lengths."""
        rows, width = rollouts.response_ids.shape
        out = torch.zeros(rows, width, model.config.hidden_size, device=rollouts.response_ids.device)
        if width == 0:
            return out
        for chunk, mini in micro_batches(rollouts, self.micro_batch_size):
            out[chunk, : mini.response_ids.shape[1]] = response_hidden(model, mini)
        return out

    @torch.no_grad()
    def values(self, rollouts: Rollouts) -> torch.Tensor:
        """[B, T] the critic's value of each response token (0 outside the response mask), before the update."""
        trunk = self.model if self.model is not None else self.policy_model
        was_training = trunk.training
        trunk.eval()
        features = self._hidden(trunk, rollouts)
        trunk.train(was_training)
        if self.kind == "head":
            self._features = features  # the head trains on these (the policy's features as it sampled)
        return self.head(features) * rollouts.response_mask

    def update(self, step: int, rollouts: Rollouts, old_values: torch.Tensor, returns: torch.Tensor) -> dict:
        """`critic_epochs` passes of the clipped value loss over the step's rows, one optimizer step per micro-batch
        of rows; returns its metrics (the loss and clip fraction of the last epoch, and how well the old values
        explained the returns)."""
        mask = rollouts.response_mask
        generator = torch.Generator().manual_seed(seed_of(self.seed, "critic_minibatches", step))
        rows = mask.shape[0]
        loss_sum = clipfrac_sum = 0.0
        for _ in range(self.epochs):
            loss_sum = clipfrac_sum = 0.0
            chunks = torch.randperm(rows, generator=generator).split(self.micro_batch_size)
            for chunk in chunks:
                chunk = chunk.to(mask.device)
                loss, clipfrac = clipped_value_loss(self._predict(rollouts, chunk), returns[chunk], old_values[chunk],
                                                    mask[chunk], self.clip)  # fmt: skip
                self.optimizer.zero_grad(set_to_none=False)
                loss.backward()
                self.optimizer.step()
                loss_sum += loss.item()
                clipfrac_sum += clipfrac.item()
        self._features = None
        return {"value_loss": loss_sum / len(chunks), "value_clipfrac": clipfrac_sum / len(chunks),
                **value_metrics(old_values, returns, mask)}  # fmt: skip

    def _predict(self, rollouts: Rollouts, chunk: torch.Tensor) -> torch.Tensor:
        if self.kind == "head":
            return self.head(self._features[chunk])
        mini = rollouts.select(chunk)
        values = torch.zeros(chunk.numel(), rollouts.response_ids.shape[1], device=chunk.device)
        values[:, : mini.response_ids.shape[1]] = self.head(response_hidden(self.model, mini))
        return values

    def state_dict(self) -> dict:
        state = {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.model is not None:
            state["model"] = self.model.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        if self.model is not None:
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def value_metrics(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict:
    """The values' mean and their explained variance of the returns, 1 - Var(R - V) / Var(R), over the mask."""
    weight = mask.float()
    count = weight.sum().clamp(min=1)

    def variance(x: torch.Tensor) -> torch.Tensor:
        mean = (x * weight).sum() / count
        return (((x - mean) ** 2) * weight).sum() / count

    spread = variance(returns)
    explained = 1 - variance(returns - values) / spread if spread > 0 else torch.tensor(0.0)
    return {"value_mean": ((values * weight).sum() / count).item(), "value_explained_variance": float(explained)}
