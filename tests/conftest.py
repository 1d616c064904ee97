import torch


def full_mask(rows: int, tokens: int = 3) -> torch.Tensor:
    return torch.ones(rows, tokens)


def per_response(adv: torch.Tensor) -> torch.Tensor:
    """The scalar of a sequence-level advantage (its first token; callers use masks starting at token 0)."""
    return adv[:, 0]
