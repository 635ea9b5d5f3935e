"""Train the fixture ResNet on Fashion-MNIST and write its weights as safetensors.

Usage, from the repo root:
    PYTHONPATH=. python benchmarks/train_fmnist_resnet.py [--epochs 3] [--out PATH.safetensors]

Seed 0, AdamW (lr 3e-3, weight decay 5e-4), OneCycle, batch 128, random horizontal flips, 2 CPU threads.
Prints the test top-1 and writes it to benchmarks/results/fmnist_resnet_train.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from compression.zoo.fmnist_resnet import WEIGHTS_PATH, build_fmnist_resnet, load_fashion_mnist

RESULTS = Path(__file__).parent / "results" / "fmnist_resnet_train.json"


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    hits = sum(
        (model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    return hits / len(images)


def train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: int,
    generator: torch.Generator,
) -> float:
    model.train()
    order = torch.randperm(len(images), generator=generator)
    loss_sum = 0.0
    for start in range(0, len(images), batch):
        idx = order[start : start + batch]
        x, y = images[idx], labels[idx]
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(x)
    return loss_sum / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    model = build_fmnist_resnet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps = args.epochs * -(-len(train_x) // args.batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)

    started = time.perf_counter()
    for epoch in range(args.epochs):
        loss = train_epoch(model, train_x, train_y, optimizer, scheduler, args.batch, generator)
        print(f"epoch {epoch + 1}: train loss {loss:.4f}, {time.perf_counter() - started:.1f} s")
    train_s = time.perf_counter() - started
    accuracy = top1(model, test_x, test_y)
    print(f"test top-1: {accuracy:.4f} ({train_s:.1f} s training, {args.threads} threads)")

    state = {k: v.detach().contiguous() for k, v in model.eval().state_dict().items()}
    save_file(state, str(args.out))
    record = {"test_top1": accuracy, "train_seconds": round(train_s, 1), "epochs": args.epochs, "seed": 0}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) and {RESULTS}")


if __name__ == "__main__":
    main()
