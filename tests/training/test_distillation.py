"""Logit distillation (``slimtune.training.distillation_loss``) and ``finetune(loss_fn=...)`` with it.

The independent check: KL(p_teacher ‖ p_student) written out in float64, token by token, from the two models'
logits, with the temperature applied by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

import slimtune as st
from cases import assert_unchanged, randomize_adapters, snapshot, tiny_gpt2, tiny_llama
from slimtune.errors import ConfigError
from slimtune.linear_attention import LinearAttention, LinearizeConfig, linearize
from slimtune.training import causal_lm_loss, distillation_loss, finetune

pytestmark = pytest.mark.usefixtures("one_thread")

HYBRID = LinearizeConfig(window=3, sink_tokens=1, chunk_size=4)


def token_blocks(n: int = 4, length: int = 11) -> torch.Tensor:
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def kl_by_hand(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor, temperature: float) -> float:
    """Mean over tokens of T² · Σ_v p(v) (log p(v) − log q(v)), p and q the softened distributions, in float64."""
    target = teacher(ids).logits.double() / temperature  # [B, T, V]
    logits = student(ids).logits.double() / temperature
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        for position in range(ids.shape[1]):
            p = torch.softmax(target[row, position], dim=-1)
            q = torch.softmax(logits[row, position], dim=-1)
            total += float((p * (p.log() - q.log())).sum())
            count += 1
    return total / count * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_the_loss_is_the_mean_token_kl_from_the_teacher_to_the_student(temperature):
    teacher, student, ids = tiny_llama(seed=0), tiny_llama(seed=1), token_blocks()
    loss = distillation_loss(teacher, temperature)(student, ids)
    assert loss.item() == pytest.approx(kl_by_hand(teacher, student, ids, temperature), rel=1e-4)
    assert loss.item() > 1e-3


def test_in_bfloat16_the_loss_is_the_kl_of_the_bfloat16_logits():
    teacher, student = tiny_llama(seed=0).to(torch.bfloat16), tiny_llama(seed=1).to(torch.bfloat16)
    ids = token_blocks()
    loss = distillation_loss(teacher)(student, ids)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(kl_by_hand(teacher, student, ids, 1.0), rel=1e-4)


def test_a_student_equal_to_its_teacher_has_zero_loss_and_zero_gradient():
    teacher, student = tiny_llama(seed=0), tiny_llama(seed=0)
    loss = distillation_loss(teacher)(student, token_blocks())
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-5
    assert all(p.grad is None for p in teacher.parameters())


def test_the_teacher_runs_in_eval_mode_without_gradients():
    teacher = tiny_llama(seed=0).train()
    student = tiny_llama(seed=1)
    loss_fn = distillation_loss(teacher)
    assert not teacher.training
    loss_fn(student, token_blocks()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_distilling_a_linearised_model_brings_it_closer_to_the_original_than_lm_training_does():
    """The ablation: the same steps, adapter and learning rate on the LM loss leave the model further from the
    original (the teacher) than distillation does."""
    ids = token_blocks(n=8, length=16)
    teacher = tiny_llama(seed=0)
    kl = {}
    for name in ("distill", "lm"):
        student = linearize(tiny_llama(seed=0), HYBRID)
        loss_fn = distillation_loss(teacher) if name == "distill" else causal_lm_loss
        finetune(student, ids, steps=30, batch_size=4, lr=3e-2, loss_fn=loss_fn, progress=False)
        kl[name] = kl_by_hand(teacher, student.eval(), ids, 1.0)
    start = kl_by_hand(teacher, linearize(tiny_llama(seed=0), HYBRID).eval(), ids, 1.0)
    assert kl["distill"] < 0.5 * start
    assert kl["distill"] < 0.5 * kl["lm"]


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "1"])
def test_a_temperature_that_is_not_a_positive_number_is_refused_naming_it(temperature):
    with pytest.raises(ConfigError, match=r"temperature="):
        distillation_loss(tiny_llama(), temperature)


def test_a_teacher_that_is_not_a_module_is_refused():
    with pytest.raises(ConfigError, match=r"teacher must be a torch nn.Module \(an HF causal LM\) or None, got str"):
        distillation_loss("HuggingFaceTB/SmolLM2-135M")  # type: ignore[arg-type]


def test_a_teacher_with_another_vocabulary_is_refused_naming_both_shapes():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_llama().config.to_dict() | {"vocab_size": 97}
    teacher = LlamaForCausalLM(LlamaConfig(**config))
    with pytest.raises(ConfigError, match=r"teacher's logits have shape \(4, 11, 97\) and the model's \(4, 11, 101\)"):
        distillation_loss(teacher)(tiny_llama(), token_blocks())


def test_packed_examples_are_refused_naming_the_shape():
    with pytest.raises(ConfigError, match=r"shape \(2, 5, 3\): expected token ids \[B, T\]"):
        distillation_loss(tiny_gpt2())(tiny_gpt2(seed=1), torch.zeros(2, 5, 3, dtype=torch.long))


def test_finetune_on_the_distillation_loss_records_it_per_step():
    teacher = tiny_llama(seed=0)
    student = linearize(tiny_llama(seed=0), HYBRID)
    ids = token_blocks()
    before = kl_by_hand(teacher, student, ids, 1.0)
    _, result = finetune(student, ids, steps=1, batch_size=4, lr=1e-9, loss_fn=distillation_loss(teacher))
    assert result.losses[0] == pytest.approx(before, rel=1e-4)
    assert math.isfinite(result.losses[0])


def adapted_hybrid(seed: int = 0) -> torch.nn.Module:
    """A linearised tiny Llama with LoRA on every projection, the adapters doing something; its original is
    ``tiny_llama(seed)``."""
    model = st.get_adapted_model(linearize(tiny_llama(seed=seed), HYBRID), st.LoraConfig(r=4, alpha=8.0))
    randomize_adapters(model)
    return model


def test_teacher_none_is_the_students_own_original_without_a_copy():
    """The loss with ``teacher=None`` equals the loss with a separate, untouched original as the teacher, and so
    does its gradient: the original computed from the student's weights, adapters off and softmax restored."""
    ids = token_blocks()
    grads = {}
    for name, teacher in (("own", None), ("copy", tiny_llama(seed=0))):
        student = adapted_hybrid()
        loss = distillation_loss(teacher)(student, ids)
        loss.backward()
        grads[name] = (loss.item(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None})
    (own, own_grads), (reference, copy_grads) = grads["own"], grads["copy"]
    assert own == pytest.approx(reference, rel=1e-5) and own > 1e-3
    assert own == pytest.approx(kl_by_hand(tiny_llama(seed=0), adapted_hybrid(), ids, 1.0), rel=1e-4)
    assert own_grads.keys() == copy_grads.keys() and own_grads
    for name, grad in own_grads.items():
        torch.testing.assert_close(grad, copy_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_teacher_none_leaves_the_student_as_it_was():
    student = adapted_hybrid().train()
    student.model.layers[0].mlp.eval()  # a mixed mode, to be kept
    ids = token_blocks()
    with torch.no_grad():
        before_out = student(ids).logits
    before = snapshot(student)
    distillation_loss()(student, ids)
    assert_unchanged(student, before)
    assert all(isinstance(layer.self_attn, LinearAttention) for layer in student.model.layers)
    assert student.training and not student.model.layers[0].mlp.training and student.model.layers[1].mlp.training
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, before_out, rtol=0, atol=0)


def test_teacher_none_of_an_adapted_model_is_its_base_model():
    """Without linear attention, the own original is the base model with the adapters disabled."""
    ids = token_blocks()
    student = st.get_adapted_model(tiny_gpt2(seed=0), st.LoraConfig(r=4))
    randomize_adapters(student)
    loss = distillation_loss(None, temperature=2.0)(student, ids)
    assert loss.item() == pytest.approx(kl_by_hand(tiny_gpt2(seed=0), student, ids, 2.0), rel=1e-4)
    assert loss.item() > 1e-4


def test_teacher_none_under_several_processes_needs_ddp(monkeypatch):
    """A model that is not DDP-wrapped under several processes (e.g. FSDP-sharded) is refused, naming the way out."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(
        ConfigError, match=r"whole model on each process; .* spread over 2 processes: pass the original"
    ):
        distillation_loss()(adapted_hybrid(), token_blocks())
