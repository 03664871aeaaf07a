"""The judge: a small CNN trained on MNIST whose features and labels score samples.

`python -m common.judge` trains it (>= 99.3 % test accuracy, a few minutes on 2 cores) into
`results/classifier/` (`classifier.pt`, and `classifier.json` with its measured test accuracy);
`load_judge` loads it, training it first if there is none. Its penultimate features are the
space MNIST-FD and precision/recall are measured in (`common.metrics`), its labels the
conditional accuracy; `common.reference` caches what samples are compared with.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import save_checkpoint, write_json
from common.cli import ArgumentParser, UserError, positive_int, user_errors
from common.data import DATA_DIR_HELP, batch_indices, load_mnist, to_unit
from common.metrics import (
    NUM_CLASSES,
    accuracy,
)
from common.runtime import count_params, seed_everything, versions

DEFAULT_DIR = Path("results/classifier")
CLASSIFIER = "classifier.pt"
INFO = "classifier.json"
REFERENCE = "reference.pt"  # written by common.reference


@dataclass
class JudgeConfig:
    """Architecture and training recipe of the judge CNN."""

    channels: tuple[int, int] = (16, 32)  # conv widths at 28x28 and at 14x14
    features: int = 128  # penultimate width: the feature space of MNIST-FD and precision/recall
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 5e-4
    augment: bool = True  # small random affine maps (rotation, scale, shift) per training image
    seed: int = 0


class JudgeCNN(nn.Module):
    """Two stages of (conv3x3-BN-ReLU) x 2 + max-pool, then a 128-unit layer and the logits.

    x: float [B, 1, 28, 28] in [0, 1] -> logits [B, 10]; `features` gives the 128 ReLU
    activations before the last linear layer ([B, 128]), the space every distance here uses.
    """

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        c1, c2 = config.channels

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, c1),
            *block(c1, c1),
            nn.MaxPool2d(2),  # 28 -> 14
            *block(c1, c2),
            *block(c2, c2),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Flatten(),
            nn.Linear(c2 * 49, config.features, bias=False),
            nn.BatchNorm1d(config.features),
            nn.ReLU(),
        )
        self.head = nn.Linear(config.features, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine map per image: rotation +-10 deg, scale 0.9..1.1, shift +-2 px.

    x: float [B, 1, 28, 28] -> same shape (bilinear resampling, zero padding).
    """
    B = x.shape[0]
    u = torch.rand(B, 4, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle, scale = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1]
    shift = u[:, 2:] * (2 / 14)  # affine_grid coordinates span [-1, 1] over 28 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def judge_outputs(
    model: JudgeCNN, images: torch.Tensor, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """images uint8 [N, 28, 28] or [N, 1, 28, 28] -> (logits [N, 10], features [N, F]), float32."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    model.eval()
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        h = model.features(to_unit(images[start : start + batch_size]))
        feats.append(h)
        logits.append(model.head(h))
    if not feats:
        return torch.empty(0, NUM_CLASSES), torch.empty(0, model.head.in_features)
    return torch.cat(logits), torch.cat(feats)


def train_classifier(
    out_dir: str | Path = DEFAULT_DIR,
    data_dir: str | Path | None = None,
    config: JudgeConfig | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train the judge on MNIST train, measure it on MNIST test, write classifier.pt/.json.

    Cross-entropy, AdamW with a one-cycle learning rate (warm-up then cosine decay), batch
    norm, and light affine augmentation; the data live in memory (common.data). Returns the
    info written to classifier.json.
    """
    config = config or JudgeConfig()
    out_dir = Path(out_dir)
    x_train, y_train = load_mnist(train=True, data_dir=data_dir)
    x_test, y_test = load_mnist(train=False, data_dir=data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    model = JudgeCNN(config)
    steps_per_epoch = max(1, len(x_train) // config.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    g = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        loss = train_epoch(model, opt, sched, (x_train, y_train), config, epoch, g, steps_per_epoch)
        acc = accuracy(judge_outputs(model, x_test)[0].argmax(1), y_test)
        log(f"judge epoch {epoch + 1}/{config.epochs}: train loss {loss:.4f} (cross-entropy, nats), "
            f"test accuracy {acc:.4f}, {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    acc = accuracy(judge_outputs(model, x_test)[0].argmax(1), y_test)
    save_checkpoint(
        out_dir / CLASSIFIER, {"kind": "judge", "model": model.state_dict(), "config": asdict(config)}
    )
    info = {
        "test_accuracy": acc,
        "test_errors": int(round((1 - acc) * len(x_test))),
        "n_train": len(x_train),
        "n_test": len(x_test),
        "train_seconds": round(seconds, 1),
        "params": count_params(model),
        "config": asdict(config),
        "data_dir": None if data_dir is None else str(data_dir),
        "versions": versions(),
        "command": "python -m common.judge",
    }
    write_json(out_dir / INFO, info)
    (out_dir / REFERENCE).unlink(missing_ok=True)  # features of the old judge are stale
    return info


def train_epoch(
    model: JudgeCNN,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    data: tuple[torch.Tensor, torch.Tensor],
    config: JudgeConfig,
    epoch: int,
    g: torch.Generator,
    steps: int,
) -> float:
    """`steps` cross-entropy steps on (augmented) training images (x, y) = data; returns the mean loss."""
    x_train, y_train = data
    model.train()
    total, n = 0.0, 0
    drop_last = len(x_train) >= config.batch_size
    for idx in list(batch_indices(len(x_train), config.batch_size, config.seed, epoch, drop_last))[:steps]:
        x = to_unit(x_train[idx])
        if config.augment:
            x = augment(x, g)
        loss = F.cross_entropy(model(x), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total, n = total + loss.item(), n + 1
    return total / max(n, 1)


class Judge:
    """The trained judge in a directory (`<dir>/classifier.pt`, `<dir>/classifier.json`), for the
    MNIST in `data_dir`; `common.reference` computes and caches what samples are compared with."""

    def __init__(self, directory: str | Path, data_dir: str | Path | None = None) -> None:
        self.dir = Path(directory)
        self.data_dir = data_dir
        path = self.dir / CLASSIFIER
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"no judge classifier at {path}; run python -m common.judge") from None
        except Exception as e:
            raise UserError(f"{path} is not a readable classifier checkpoint: {str(e)[:200]}") from None
        if not isinstance(state, dict) or state.get("kind") != "judge":
            raise UserError(f"{path} is not a judge classifier checkpoint")
        cfg = dict(state["config"])
        cfg["channels"] = tuple(cfg["channels"])
        self.config = JudgeConfig(**cfg)
        self.model = JudgeCNN(self.config)
        self.model.load_state_dict(state["model"])
        self.model.eval()
        info_path = self.dir / INFO
        self.info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        self.file_hash = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
        self.reference: Any = None  # common.reference.Reference, once computed

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images uint8 [N, 28, 28] -> (logits [N, 10], features [N, F])."""
        return judge_outputs(self.model, images)


def load_judge(
    classifier: str | Path | None = None, data_dir: str | Path | None = None, train: bool = True
) -> Judge:
    """The judge in `classifier` (a directory, or its classifier.pt; default results/classifier).

    If there is none and `train` is set, it is trained there first (a few minutes on 2 cores).
    """
    directory = Path(classifier) if classifier is not None else DEFAULT_DIR
    if directory.suffix == ".pt":
        directory = directory.parent
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--classifier {directory} is not a directory")
    if not (directory / CLASSIFIER).is_file():
        if not train:
            raise UserError(f"no judge classifier in {directory}; run python -m common.judge")
        print(f"no judge classifier in {directory}: training one now", file=sys.stderr, flush=True)
        train_classifier(directory, data_dir, log=lambda *a, **kw: print(*a, file=sys.stderr, **kw))
    return Judge(directory, data_dir)


def judge_summary(judge: Judge) -> dict[str, Any]:
    """What metrics.json records about the judge (its test accuracy, where it lives)."""
    return {
        "dir": str(judge.dir),
        "test_accuracy": judge.info.get("test_accuracy"),
        "params": count_params(judge.model),
        "features": judge.config.features,
    }


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m common.judge", description=__doc__)
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--out", default=str(DEFAULT_DIR), help="classifier directory")
    p.add_argument("--epochs", type=positive_int, default=JudgeConfig.epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing classifier")
    return p


@user_errors
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the judge; prints and returns what classifier.json records."""
    a = build_parser().parse_args(argv)
    out = Path(a.out)
    if (out / CLASSIFIER).exists() and not a.overwrite:
        raise UserError(f"{out / CLASSIFIER} exists; pass --overwrite to retrain it")
    info = train_classifier(out, a.data_dir, JudgeConfig(epochs=a.epochs, seed=a.seed))
    print(json.dumps({k: info[k] for k in ("test_accuracy", "test_errors", "train_seconds", "params")}))
    return info


if __name__ == "__main__":
    main()
