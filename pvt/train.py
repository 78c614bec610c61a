"""A short, real training run on scikit-learn's digits, single process or DistributedDataParallel.

Under ``torchrun`` (WORLD_SIZE > 1) every process trains on its DistributedSampler shard (gloo on
CPU, nccl on CUDA); rank 0 alone draws progress, evaluates, prints and saves.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

from sra_kernels.files import atomic_open

from .checkpoints import load_state_dict, read_checkpoint
from .progress import ProgressBar
from .registry import create_model
from .segformer import SegFormer

NUM_DIGIT_CLASSES = 10


@dataclass
class TrainConfig:
    model: str
    epochs: int = 3
    batch_size: int = 64  # per process
    lr: float = 1e-3
    weight_decay: float = 0.05
    img_size: tuple[int, int] = (32, 32)
    backend: str = "auto"
    seed: int = 0
    val_fraction: float = 0.2
    subset: int | None = None  # train on the first `subset` training images only (quick runs)
    save: str | None = None
    resume: str | None = None
    progress: bool = True
    compile: str = "none"  # torch.compile mode of the training forward: none (eager), default, reduce-overhead
    compile_backend: str = "inductor"
    bf16: bool = False  # bf16 autocast of forward and loss; weights, gradients and optimizer stay fp32
    grad_checkpointing: bool = False  # blocks recompute their activations in the backward (less memory)


def digits_datasets(img_size: tuple[int, int], val_fraction: float = 0.2, seed: int = 0):
    """Digits (1797 8x8 grey images, 10 classes) upsampled bilinearly to ``img_size``, grey replicated
    to 3 channels, scaled to [-1, 1]; a seeded train/val split. Returns (train, val) TensorDatasets of
    images (n, 3, H, W) float32 and labels (n,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=tuple(img_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TensorDataset, batch_size: int, device: torch.device):
    """(mean cross-entropy, accuracy) of ``model`` on ``dataset``."""
    model.eval()
    loss, correct = 0.0, 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        logits = model(images.to(device))
        labels = labels.to(device)
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    return loss / len(dataset), correct / len(dataset)


def _setup_distributed() -> tuple[bool, int, torch.device]:
    """(distributed, rank, device) from torchrun's environment."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not distributed:
        return False, 0, device
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): start at most "
                "that many processes per node (torchrun --nproc_per_node), or set CUDA_VISIBLE_DEVICES= to train on "
                "the CPU with gloo")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True, dist.get_rank(), device


def prepare_save_folder(path: str | os.PathLike) -> None:
    """Create the folder of checkpoint file ``path`` when missing; ValueError when ``path`` cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"cannot save checkpoints to {path}: it is a folder, not a file")
    folder = target.parent
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save checkpoints to {path}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot save checkpoints to {path}: cannot create {folder}: {error.strerror}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot save checkpoints to {path}: {folder} is not writable")


def train(cfg: TrainConfig) -> list[dict]:
    """Train ``cfg.model`` on digits; returns one dict per epoch run (train_loss, train_acc, val_loss,
    val_acc, step_losses: rank 0's loss of every step; empty dicts on ranks other than 0). ``cfg.compile``
    compiles the training forward (DDP-wrapped under torchrun); evaluation runs the model eagerly. Saves
    {model, optimizer, epoch, model_name} to ``cfg.save`` after every epoch (atomically: a kill leaves the
    previous epoch's file) and continues from ``cfg.resume``'s next epoch."""
    if cfg.save:
        prepare_save_folder(cfg.save)
    distributed, rank, device = _setup_distributed()
    try:
        return _train(cfg, distributed, rank, device)
    finally:
        if distributed:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, distributed: bool, rank: int, device: torch.device) -> list[dict]:
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=NUM_DIGIT_CLASSES, backend=cfg.backend, img_size=cfg.img_size)
    if model.num_classes == 0 or isinstance(model, SegFormer):
        raise ValueError(f"{cfg.model} is a feature backbone or a segmentation model, not a classifier; "
                         "train a pvt_* model")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch = 0
    if cfg.resume:
        checkpoint = read_checkpoint(cfg.resume)
        if checkpoint.get("model_name") != cfg.model:
            raise ValueError(f"{cfg.resume} holds {checkpoint.get('model_name')!r}, not {cfg.model!r}")
        load_state_dict(model, checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch = checkpoint["epoch"] + 1
        if start_epoch >= cfg.epochs:
            raise ValueError(f"{cfg.resume} already holds epoch {start_epoch} of {cfg.epochs}: nothing to train "
                             "(epochs counts the resumed ones too)")
    net = model
    if distributed:
        # DWConv weights (C, 1, 3, 3) get grads whose size-1 dim has another stride than DDP's bucket
        # view: harmless, but DDP warns at every step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile != "none":  # DDP's optimizer splits the compiled graph at its buckets: no fullgraph
        net = torch.compile(net, mode=cfg.compile if cfg.compile_backend == "inductor" else None,
                            backend=cfg.compile_backend)

    train_set, val_set = digits_datasets(cfg.img_size, cfg.val_fraction, cfg.seed)
    if cfg.subset is not None:
        train_set = TensorDataset(*(t[:cfg.subset] for t in train_set.tensors))
    sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed) if distributed else \
        RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed))
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler)
    if rank == 0:
        world = dist.get_world_size() if distributed else 1
        print(f"training {cfg.model} on {world} process(es) ({device.type}): {len(train_set)} train / "
              f"{len(val_set)} val digits at {cfg.img_size[0]}x{cfg.img_size[1]}, epochs {start_epoch + 1}..{cfg.epochs}",
              flush=True)

    history = []
    for epoch in range(start_epoch, cfg.epochs):
        if distributed:
            sampler.set_epoch(epoch)
        net.train()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        losses = []
        with ProgressBar(len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and rank == 0) as bar:
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                if cfg.compile == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be reused
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    logits = net(images)
                    loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals += torch.stack([loss.detach().double() * len(labels),
                                       (logits.argmax(1) == labels).sum().double(),
                                       torch.tensor(len(labels), dtype=torch.float64, device=device)])
                losses.append(loss.item())
                bar.update(loss=losses[-1])
        if distributed:
            dist.all_reduce(totals)
        if rank == 0:
            history.append({**_finish_epoch(cfg, model, optimizer, epoch, totals, val_set, device),
                            "step_losses": losses})
        else:
            history.append({})
        if distributed:
            dist.barrier()  # the other ranks wait for rank 0's evaluation and checkpoint
    return history


def _finish_epoch(cfg: TrainConfig, model, optimizer, epoch: int, totals: torch.Tensor, val_set, device) -> dict:
    """Rank 0's end of an epoch: evaluate, print, save the checkpoint; returns the epoch's stats."""
    val_loss, val_acc = evaluate(model, val_set, 256, device)
    stats = {"epoch": epoch + 1, "train_loss": totals[0].item() / totals[2].item(),
             "train_acc": totals[1].item() / totals[2].item(), "val_loss": val_loss, "val_acc": val_acc}
    print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.3f} | "
          f"val loss {val_loss:.4f} acc {val_acc:.3f}", flush=True)
    if cfg.save:
        with atomic_open(cfg.save) as file:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "model_name": cfg.model}, file)
    return stats
