"""The PPO loop's memory choices: the critic reads a frozen input embedding (the reference's table, not a trained
copy), and the optimiser steps through fused AdamW and drops the gradients it applied."""

import pytest
import torch

from rlhf_fast.ppo import PPOConfig, models, optim, precision, tasks
from rlhf_fast.ppo.trainer import encode_prompts


def _models(dtype=torch.float32):
    torch.manual_seed(0)
    tokenizer = tasks.CharTokenizer()
    policy = models.tiny_llama(
        tokenizer.vocab_size, PPOConfig(hidden_size=32, num_layers=1, num_heads=2, tie_embeddings=True)
    )
    reference = models.frozen_copy(policy, dtype)
    critic = models.ValueModel.from_policy(policy)
    torch.nn.init.normal_(critic.head.weight, std=0.1)
    ids, mask = encode_prompts(tokenizer, ["12=3", "3456=34", "7=7"], "cpu")
    return reference, critic, ids, mask


def test_critic_reads_the_reference_embedding_and_trains_the_rest():
    reference, critic, ids, mask = _models()
    table = reference.get_input_embeddings().weight
    table_before = table.detach().clone()
    with torch.no_grad():
        values_before = critic(ids, mask, n_prompt=2)
    critic.freeze_embedding(reference)
    assert critic.trunk.get_input_embeddings() is reference.get_input_embeddings()
    trainable = [name for name, p in critic.named_parameters() if p.requires_grad]
    assert trainable and not any("embed" in name for name in trainable)
    rest_before = [p.detach().clone() for p in critic.parameters() if p.requires_grad]
    optimizer = optim.adamw(critic.parameters(), lr=1e-2)
    values = critic(ids, mask, n_prompt=2)
    torch.testing.assert_close(values, values_before, rtol=0, atol=0)
    (values * torch.randn_like(values)).sum().backward()
    assert table.grad is None
    optim.clip_and_step(optimizer, critic.parameters(), 1.0)
    assert torch.equal(table, table_before) and table not in optimizer.state
    moved = [not torch.equal(a, p) for a, p in zip(rest_before, (p for p in critic.parameters() if p.requires_grad))]
    assert all(moved)


@pytest.mark.parametrize("source", ["none", "bf16", "different"])
def test_critic_keeps_its_own_frozen_embedding_when_the_source_differs(source):
    reference, critic, ids, mask = _models(torch.bfloat16 if source == "bf16" else torch.float32)
    if source == "different":
        with torch.no_grad():
            reference.get_input_embeddings().weight.add_(0.01)
    own = critic.trunk.get_input_embeddings()
    critic.freeze_embedding(None if source == "none" else reference)
    assert critic.trunk.get_input_embeddings() is own and not own.weight.requires_grad
    critic(ids, mask, n_prompt=2).sum().backward()
    assert own.weight.grad is None and critic.head.weight.grad is not None


def test_frozen_embedding_critic_under_bf16_autocast_gives_float32_values():
    reference, critic, ids, mask = _models()
    critic = precision.critic(critic, PPOConfig(dtype="bf16"), torch.device("cpu"))
    critic.freeze_embedding(reference)
    values = critic(ids, mask, n_prompt=2)
    assert values.dtype == torch.float32 and torch.isfinite(values).all()


def test_fused_adamw_is_the_default_update_and_the_step_drops_the_gradients():
    g = torch.Generator().manual_seed(1)
    start = [torch.randn(37, 5, generator=g), torch.randn(11, generator=g)]
    grads = [[3 * torch.randn(p.shape, generator=g) for p in start] for _ in range(6)]
    runs = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda ps: optim.adamw(ps, lr=1e-2)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params)
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in step_grads]))
            norm = optim.clip_and_step(optimizer, params, 1.0)  # the norm is ~20: every step clips
            torch.testing.assert_close(norm, expected_norm)
            assert all(p.grad is None for p in params)
        runs.append([p.detach() for p in params])
    assert optim.adamw([torch.nn.Parameter(torch.zeros(2))], lr=1e-2).defaults["fused"]
    for default, ours in zip(*runs):
        assert not torch.equal(ours, start[0] if ours.dim() == 2 else start[1])
        torch.testing.assert_close(ours, default, rtol=1e-6, atol=1e-6)
