"""rlhf_fast.integrations.transformers: generate's warpers + multinomial replaced by rf.sample, with the same law;
head_transform."""

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from test_sampling import _assert_matches_distribution  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation import logits_process as lp  # noqa: E402
from transformers.generation import utils as generation  # noqa: E402

from rlhf_fast import reference  # noqa: E402
from rlhf_fast.integrations import transformers as rf_transformers  # noqa: E402


def _model(vocab=1003):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def test_patch_fuses_the_warpers_and_unpatch_restores():
    original_processor = generation.GenerationMixin.__dict__["_get_logits_processor"]
    model = _model()
    with rf_transformers.patch() as handle:
        assert rf_transformers.patch() is handle  # idempotent
        assert generation.torch is not torch
        config = model.generation_config
        config.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)
        processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=4,
            encoder_input_ids=None,
            prefix_allowed_tokens_fn=None,
            logits_processor=lp.LogitsProcessorList(),
            device="cpu",
        )
        fused = processors[-1]
        assert isinstance(fused, rf_transformers.FusedSampling)
        assert (fused.temperature, fused.top_k, fused.top_p, fused.min_p) == (0.7, 20, 0.9, 0.05)
        assert not any(isinstance(p, (lp.TopKLogitsWarper, lp.TopPLogitsWarper)) for p in processors)
    assert generation.torch is torch
    assert generation.GenerationMixin.__dict__["_get_logits_processor"] is original_processor


def test_plain_sampling_gets_the_fused_sampler_too():
    processors = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.2)])
    fused = rf_transformers.fuse_warpers(processors)
    assert isinstance(fused[0], lp.RepetitionPenaltyLogitsProcessor) and len(fused) == 2
    assert (fused[1].temperature, fused[1].top_k, fused[1].top_p, fused[1].min_p) == (1.0, None, None, None)


def test_other_warpers_are_left_alone():
    processors = lp.LogitsProcessorList(
        [lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(10), lp.TypicalLogitsWarper(0.9)]
    )
    assert rf_transformers.fuse_warpers(processors) is processors
    processors = lp.LogitsProcessorList(
        [
            lp.RepetitionPenaltyLogitsProcessor(1.2),
            lp.TopKLogitsWarper(10),
            lp.TopPLogitsWarper(0.8, min_tokens_to_keep=2),
        ]
    )
    assert rf_transformers.fuse_warpers(processors) is processors  # the last warper keeps 2 tokens: not ours
    processors = lp.LogitsProcessorList(
        [lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TopKLogitsWarper(10), lp.TopPLogitsWarper(0.8)]
    )
    fused = rf_transformers.fuse_warpers(processors)
    assert isinstance(fused[0], lp.RepetitionPenaltyLogitsProcessor) and len(fused) == 2
    assert (fused[1].top_k, fused[1].top_p, fused[1].temperature) == (10, 0.8, 1.0)


@pytest.mark.parametrize(
    "settings", [dict(temperature=0.8), dict(top_k=7), dict(top_p=0.85, temperature=1.3), dict(min_p=0.1)], ids=str
)
def test_one_step_law_equals_the_warpers(settings):
    """The patched step (FusedSampling, then softmax + the generation module's multinomial) draws from the law
    of Hugging Face's warpers, on many rows at once."""
    g = torch.Generator().manual_seed(4)
    row = torch.randn(1, 50, generator=g) * 2
    processors = lp.LogitsProcessorList()
    for name, warper in (
        ("temperature", lp.TemperatureLogitsWarper),
        ("top_k", lp.TopKLogitsWarper),
        ("top_p", lp.TopPLogitsWarper),
        ("min_p", lp.MinPLogitsWarper),
    ):
        if name in settings:
            processors.append(warper(settings[name]))
    exact = torch.softmax(processors(None, row.double()), dim=-1)[0]
    fused = rf_transformers.fuse_warpers(processors)
    assert len(fused) == 1
    with rf_transformers.patch():
        torch.manual_seed(11)
        scores = fused(None, row.expand(30000, 50).contiguous())
        tokens = generation.torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
    _assert_matches_distribution(tokens, exact)
    torch.testing.assert_close(exact.log(), reference.filtered_log_probs(row[0], **settings).exp().log())


def test_multinomial_stand_in_only_takes_its_own_draw():
    with rf_transformers.patch():
        probs = torch.softmax(torch.randn(5, 9), -1)
        torch.manual_seed(0)
        expected = torch.multinomial(probs, 1)
        torch.manual_seed(0)
        assert torch.equal(generation.torch.multinomial(probs, 1), expected)  # nothing drawn: torch's own


def test_generate_runs_patched_and_is_seeded():
    model = _model()
    prompt = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 10]])
    kwargs = dict(do_sample=True, max_new_tokens=6, top_k=50, top_p=0.95, temperature=0.9, pad_token_id=0)
    with rf_transformers.patch():
        torch.manual_seed(3)
        first = model.generate(prompt, **kwargs)
        torch.manual_seed(3)
        second = model.generate(prompt, **kwargs)
    assert torch.equal(first, second)
    assert first.shape[0] == 2 and first.shape[1] > prompt.shape[1]
    assert bool(((first >= 0) & (first < model.config.vocab_size)).all())
    torch.manual_seed(3)
    unpatched = model.generate(prompt, **kwargs)  # runs HF's own path again
    assert unpatched.shape[0] == 2 and not math.isnan(float(unpatched.float().sum()))


def test_head_transform_reads_hugging_face_configs():
    from transformers import CohereConfig, Gemma2Config, Gemma3Config, GraniteConfig, LlamaConfig

    head_transform = rf_transformers.head_transform
    assert head_transform(Gemma2Config(final_logit_softcapping=30.0)) == {"logit_scale": 1.0, "softcap": 30.0}
    assert head_transform(CohereConfig(logit_scale=0.0625)) == {"logit_scale": 0.0625, "softcap": None}
    assert head_transform(CohereConfig(logit_scale=None)) == {"logit_scale": 1.0, "softcap": None}
    assert head_transform(LlamaConfig()) == {"logit_scale": 1.0, "softcap": None}
    gemma3 = Gemma3Config(text_config={"final_logit_softcapping": 20.0})  # multimodal: read from its text config
    assert head_transform(gemma3) == {"logit_scale": 1.0, "softcap": 20.0}
    assert head_transform(GraniteConfig(logits_scaling=1.0)) == {"logit_scale": 1.0, "softcap": None}
    with pytest.raises(ValueError, match="logits_scaling"):
        head_transform(GraniteConfig(logits_scaling=8.0))


def test_import_is_cheap():
    # the PPO loop imports this module for head_transform: no transformers, no peer trainer until patch()
    code = (
        "import sys, rlhf_fast.integrations.transformers; "
        "print([m for m in ('transformers', 'trl', 'verl', 'openrlhf') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
