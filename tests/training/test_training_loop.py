"""slimtune.training.train: accumulation equivalence, schedule, evaluation, the JSONL log, data order, the loss
function and the mode it trains in. (A NaN stop: test_nan_stop.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

import slimtune as st
from cases import tiny_llama
from slimtune.training import METRICS_FILE, TrainConfig, causal_lm_loss, cosine_with_warmup, evaluate_lm, train
from slimtune.training.checkpoint import decode, encode
from slimtune.training.order import BlockOrder
from train_script import token_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def adapted(dropout: float = 0.0) -> torch.nn.Module:
    return st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4, alpha=8.0, dropout=dropout))


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(tmp_path=None, steps: int = 4, eval_blocks=None, on_step=None, **settings) -> tuple[torch.nn.Module, object]:
    model = adapted()
    config = TrainConfig(
        steps=steps, lr=1e-2, seed=1, progress=False, output_dir=tmp_path and str(tmp_path), **settings
    )
    return model, train(model, token_blocks(12, seed=0), config, eval_blocks, on_step)


def test_gradient_accumulation_equals_one_large_batch():
    results = {}
    for batch_size, grad_accum in ((4, 1), (2, 2), (1, 4)):
        model, result = run(steps=3, batch_size=batch_size, grad_accum=grad_accum)
        results[(batch_size, grad_accum)] = (trainable(model), result.losses)
    reference, losses = results[(4, 1)]
    for weights, other_losses in results.values():
        assert other_losses == pytest.approx(losses, rel=1e-6)
        for name, tensor in reference.items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_the_loss_falls_and_the_base_stays_frozen():
    model = adapted()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = evaluate_lm(model, token_blocks(6, seed=2))
    train(model, token_blocks(12, seed=0), TrainConfig(steps=30, batch_size=4, lr=1e-2, progress=False))
    assert evaluate_lm(model, token_blocks(6, seed=2)) < before - 0.5
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_schedule_warms_up_then_follows_the_cosine(tmp_path):
    records = []
    run(tmp_path, steps=8, warmup=3, on_step=records.append)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    expected = []
    scheduler = cosine_with_warmup(optimizer, 3, 8)
    for _ in range(8):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [r["lr"] for r in records] == pytest.approx(expected)
    assert [r["lr"] for r in records][:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])


def test_periodic_evaluation_and_jsonl_log(tmp_path):
    held_out = token_blocks(5, seed=2)
    model, result = run(tmp_path, steps=5, eval_every=2, eval_blocks=held_out)
    assert sorted(result.eval_losses) == [2, 4, 5]
    assert result.eval_losses[5] == pytest.approx(evaluate_lm(model, held_out), rel=1e-6)
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["loss"] for line in lines] == result.losses
    assert [line.get("eval_loss") for line in lines] == [
        None,
        result.eval_losses[2],
        None,
        result.eval_losses[4],
        result.eval_losses[5],
    ]
    assert {"lr", "epoch", "step_seconds"} <= set(lines[0])
    assert result.tokens == 5 * 2 * 16 and len(result.step_seconds) == 5


def test_a_loss_function_gets_the_blocks_in_order_in_the_mode_asked_for_and_is_also_what_is_evaluated():
    seen: list[tuple[list[list[int]], bool]] = []

    def twice_the_lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        seen.append((batch.tolist(), model.training))
        return 2 * causal_lm_loss(model, batch)

    blocks, held_out = token_blocks(5, seed=0), token_blocks(3, seed=2)
    model = adapted(dropout=0.3)
    with torch.no_grad():
        first = 2 * causal_lm_loss(model.eval(), blocks[:2]).item()  # eval mode: no dropout
    config = TrainConfig(steps=3, batch_size=2, lr=1e-2, shuffle=False, eval_every=3, eval_batch_size=2, progress=False)
    result = train(model, blocks, config, held_out, loss_fn=twice_the_lm_loss, train_mode=False)
    assert [batch for batch, _ in seen[:3]] == [blocks[rows].tolist() for rows in ([0, 1], [2, 3], [4, 0])]
    assert [batch for batch, _ in seen[3:]] == [held_out[:2].tolist(), held_out[2:].tolist()]
    assert not any(training for _, training in seen) and not model.training
    assert result.losses[0] == pytest.approx(first, rel=1e-6)
    assert result.eval_losses[3] == pytest.approx(2 * evaluate_lm(model, held_out), rel=1e-6)
    seen.clear()
    train(model, blocks, TrainConfig(steps=1, progress=False), loss_fn=twice_the_lm_loss)
    assert [training for _, training in seen] == [True] and model.training


def test_block_order_is_a_permutation_per_epoch_and_depends_only_on_the_position():
    order = BlockOrder(7, seed=5, shuffle=True)
    epochs = order.indices(0, 21).view(3, 7)
    assert all(sorted(epoch.tolist()) == list(range(7)) for epoch in epochs)
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(BlockOrder(7, seed=5, shuffle=True).indices(10, 6), epochs.flatten()[10:16])
    assert BlockOrder(7, seed=5, shuffle=False).indices(5, 4).tolist() == [5, 6, 0, 1]


def test_each_seed_has_its_own_order_and_seed_zero_keeps_its_order():
    orders = {tuple(BlockOrder(16, seed=seed, shuffle=True).indices(0, 16).tolist()) for seed in range(6)}
    assert len(orders) == 6  # torch keeps the seed's low 32 bits only: (seed << 32) + epoch gave one order for all
    for epoch in (0, 3):
        expected = torch.randperm(16, generator=torch.Generator().manual_seed(epoch))
        assert torch.equal(BlockOrder(16, seed=0, shuffle=True).indices(16 * epoch, 16), expected)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"grad_accum": 0}, "grad_accum"),
        ({"warmup": -1}, "warmup"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"eval_every": 0}, "eval_every"),
        ({"checkpoint_every": 2}, "checkpoint_every"),
        ({"resume": True}, "resume"),
        ({"lr": float("inf")}, "lr"),
    ],
)
def test_bad_train_config(settings, field):
    with pytest.raises(st.ConfigError, match=f"{field}="):
        TrainConfig(**settings)


def test_checkpoint_codec_round_trips_optimizer_and_rng_state():
    import numpy as np

    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
        "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3, "foreach": None}],
        "numpy": np.random.get_state(legacy=False),
        "nan": math.nan,
    }
    tensors: dict[str, torch.Tensor] = {}
    back = decode(json.loads(json.dumps(encode(state, tensors))), tensors)
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and back["param_groups"][0]["foreach"] is None
    assert np.array_equal(back["numpy"]["state"]["key"], state["numpy"]["state"]["key"])
    assert back["numpy"]["state"]["key"].dtype == np.uint32 and math.isnan(back["nan"])
