import pytest
import torch


def full_mask(rows: int, tokens: int = 3) -> torch.Tensor:
    return torch.ones(rows, tokens)


def per_response(adv: torch.Tensor) -> torch.Tensor:
    """The scalar of a sequence-level advantage (its first token; callers use masks starting at token 0)."""
    return adv[:, 0]


def tiny_lab_model():
    """A random 2-layer Llama with the lab tokenizer (seeded): (model, tokenizer), for tests that need a policy."""
    from canonrl.lab.lab_task import build_tokenizer
    from canonrl.lab.warmstart import WarmstartConfig, build_model

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_model(WarmstartConfig(hidden_size=32, intermediate_size=64, layers=2, heads=2), tokenizer)
    return model, tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when another process holds the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
