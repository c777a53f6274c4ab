"""Far-off starts, re-created (docs/hypergradient.md's setting): a 16-32-4 tanh MLP learning a
random teacher's 4 classes (1024 points, minibatches of 64, 300 steps, seeds 0 and 1), HyperAdam
started at lr 1e-5, 1e-4, 1e-3 and 1e-2. Per configuration: the spread (max - min) of the final
full-batch loss over the four starts and its mean, each averaged over the seeds; one JSON line.

    python docs/results/mlp-starts/study.py > docs/results/mlp-starts/study.jsonl
"""

from __future__ import annotations

import json

import torch

from hf_tuningfree.optim import HyperAdam

STARTS = (1e-5, 1e-4, 1e-3, 1e-2)
CONFIGS: dict[str, dict] = {
    "height 1": {"height": 1},
    "height 2": {"height": 2},
    "height 1, per_tensor": {"height": 1, "per_tensor": True},
    "height 2, per_tensor": {"height": 2, "per_tensor": True},
    "height 0 (plain Adam)": {"height": 0},
}


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 16, generator=gen)
    teacher = _mlp()
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=gen)
    with torch.no_grad():
        return x, teacher(x).argmax(1)


def final_loss(lr: float, seed: int, **kwargs: object) -> float:
    x, y = _data(seed)
    torch.manual_seed(seed)
    model = _mlp()
    opt = HyperAdam(model.parameters(), lr=lr, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(300):
        idx = torch.randint(0, 1024, (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


def main() -> None:
    torch.set_num_threads(1)
    for name, kwargs in CONFIGS.items():
        spreads, means = [], []
        for seed in (0, 1):
            losses = [final_loss(lr, seed, **kwargs) for lr in STARTS]
            spreads.append(max(losses) - min(losses))
            means.append(sum(losses) / len(losses))
        spread, mean = round(sum(spreads) / 2, 3), round(sum(means) / 2, 3)
        print(json.dumps({"config": name, "spread": spread, "mean": mean}), flush=True)


if __name__ == "__main__":
    main()
