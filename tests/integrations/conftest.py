import copy

import pytest
import torch
import transformers


def build_tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 128, (2, 16), generator=g)


def train_steps(model, ids, steps=3, lr=1e-2):
    """A few real AdamW steps with the regularizer, so the factors move."""
    from sorsa_kernels import add_regularizer_grad

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        add_regularizer_grad(model, 4e-4, lr)
        opt.step()
        opt.zero_grad()
    return model.eval()


def fresh_copy(model):
    return copy.deepcopy(model)
