"""`make demo`: adapt the real SmolLM2-135M with Bone, train briefly on BBC News text, show what changed.

Steps: load the bundled model (converted from GGUF once, then cached), measure held-out loss, inject Bone
(r=64 on all seven projections), train ``--steps`` AdamW steps on packed BBC News text, measure held-out loss
again, save the adapter, load it into a fresh copy and check the outputs are identical, then merge it into the
weights and generate a few tokens. Run ``python -m slimtune.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

import slimtune as st
from slimtune.data import lm_blocks
from slimtune.models import load_smollm2
from slimtune.train import evaluate_lm, train_lm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-blocks", type=int, default=24)
    parser.add_argument("--out", default="runs/demo/bone")
    args = parser.parse_args()
    torch.manual_seed(0)

    start = time.perf_counter()
    model, tokenizer = load_smollm2(dtype=torch.float32)
    print(f"loaded SmolLM2-135M in {time.perf_counter() - start:.1f} s")
    train = lm_blocks(tokenizer, split="train", seq_len=args.seq_len, max_blocks=args.steps * args.batch_size)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=args.seq_len, max_blocks=args.eval_blocks)
    base = copy.deepcopy(model)

    before = evaluate_lm(model, held_out, args.batch_size)
    st.get_adapted_model(model, st.DishaConfig(r=args.r, variant="bone", target_modules=TARGETS))
    print(f"Bone r={args.r}: {st.parameter_counts(model)}")
    result = train_lm(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    after = evaluate_lm(model, held_out, args.batch_size)
    print(f"training loss: first step {result.losses[0]:.4f}, last step {result.losses[-1]:.4f} "
          f"({result.tokens:,} tokens in {result.seconds:.1f} s)")
    print(f"held-out BBC News loss: before {before:.4f} (ppl {math.exp(before):.2f}) -> "
          f"after {after:.4f} (ppl {math.exp(after):.2f})")

    st.save_adapter(model, args.out)
    reloaded = st.load_adapter(copy.deepcopy(base), args.out)
    probe = held_out[:1]
    model.eval()
    same = torch.equal(reloaded(input_ids=probe).logits, model(input_ids=probe).logits)
    print(f"saved to {args.out}; reloaded adapter gives identical logits: {same}")

    merged = st.merge_and_unload(model)
    prompt = tokenizer("The government said", return_tensors="pt")
    output = merged.generate(**prompt, max_new_tokens=20, do_sample=False)
    print("merged model generates:", repr(tokenizer.decode(output[0], skip_special_tokens=True)))
    print(f"demo finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
