"""What each method changes in the weights, read from the saved models: per transformer block,
the relative size of the change of its linear layers, ||W_tuned - W_base||_F / ||W_base||_F
(all its matrices together), and how many directions each change uses, its effective rank:
exp of the entropy of its normalised singular values (Roy & Vetterli 2007), which is r for a
change spread evenly over r directions and 1 for a single direction. LoRA's change has rank at
most r by construction (Hu et al. 2021); a full fine-tune's rank is what the data asks for.
"""

import torch

from minituner.hf.folder import load_pretrained


def linear_weights(model_dir) -> dict[str, torch.Tensor]:
    """The matrices of every block's linear layers, by name, in float32."""
    model, _ = load_pretrained(model_dir, device="cpu", dtype=torch.float32)
    return {name: p.detach() for name, p in model.named_parameters()
            if name.startswith("layers.") and p.dim() == 2}


def effective_rank(delta: torch.Tensor) -> float:
    """exp(entropy) of the singular values of `delta` normalised to sum 1 (0 for no change)."""
    s = torch.linalg.svdvals(delta.double())
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def weight_change(base_dir, tuned_dir) -> dict:
    """{"relative": [per block ||ΔW|| / ||W||], "rank": mean effective rank of the changed
    matrices, "ranks": {kind: mean over blocks} (q_proj, ..., down_proj)} of tuned vs base."""
    base, tuned = linear_weights(base_dir), linear_weights(tuned_dir)
    blocks: dict[int, list[float]] = {}
    ranks: dict[str, list[float]] = {}
    for name, w in base.items():
        delta = tuned[name] - w
        block = int(name.split(".")[1])
        sums = blocks.setdefault(block, [0.0, 0.0])
        sums[0] += float(delta.double().pow(2).sum())
        sums[1] += float(w.double().pow(2).sum())
        ranks.setdefault(name.split(".")[-2], []).append(effective_rank(delta))
    relative = [(d / w) ** 0.5 for _, (d, w) in sorted(blocks.items())]
    by_kind = {kind: sum(r) / len(r) for kind, r in ranks.items()}
    every = [r for rs in ranks.values() for r in rs]
    return {"relative": relative, "rank": sum(every) / len(every), "ranks": by_kind}
