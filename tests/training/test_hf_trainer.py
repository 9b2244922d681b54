"""A slimtune-adapted model trains under ``transformers.Trainer`` and saves through ``slimtune.save_adapter``."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import slimtune as st
from cases import tiny_llama
from train_script import token_blocks


@pytest.mark.parametrize(
    "config", [st.LoraConfig(r=4, alpha=8.0), st.DishaConfig(r=6, variant="bat_row")], ids=["lora", "bat_row"]
)
def test_trainer_trains_only_the_adapter_and_saves_it(tmp_path, config):
    torch.manual_seed(0)
    model = st.get_adapted_model(tiny_llama(), config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    blocks = token_blocks(16, seed=0)
    dataset = [{"input_ids": block, "labels": block} for block in blocks]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=30,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 6 and logged[-1] < logged[0] - 0.3
    adapter_names = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in adapter_names), name

    st.save_adapter(model, tmp_path / "adapter")
    reloaded = st.load_adapter(tiny_llama(), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=blocks[:2]).logits, model(input_ids=blocks[:2]).logits)
