"""stockfmnist: model, data and train/test functions, as Flower's quickstart-pytorch has them.

The benchmark's workload (Fashion-MNIST, IID partitions, the same CNN as flowerbed's, SGD with
batch 32 for one local epoch, evaluation on the 10,000 test images) written the way Flower's
quickstart writes it: the ClientApp loads and partitions the data with flwr-datasets inside the
call, with a module-level cache; batches come from a ``DataLoader`` over a Hugging Face dataset
with a per-sample torchvision transform. The quickstart downloads its data from the Hugging Face
Hub through ``FederatedDataset``; here the machine is offline, so the Fashion-MNIST IDX files are
turned once into the same kind of Hugging Face dataset (PNG images, saved with
``save_to_disk``, memory-mapped on every load, as the Hub cache is) and partitioned with
flwr-datasets' ``IidPartitioner``. Nothing here imports flowerbed.
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, ToTensor


class Net(nn.Module):
    """The CNN of the benchmark (the same layers as flowerbed's ``CNN``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def cache_dir() -> Path:
    """Where the Hugging Face copy of Fashion-MNIST is kept (the quickstart's Hub cache)."""
    base = os.environ.get("FLOWERBED_CACHE") or Path.home() / ".cache" / "flowerbed"
    return Path(base) / "stock-fmnist"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, data_dir: str):
    """Fashion-MNIST ``split`` ("train" or "test") as a Hugging Face dataset (image, label)."""
    from datasets import ClassLabel, Dataset, Features, Image, load_from_disk

    path = cache_dir() / split
    if not (path / "dataset_info.json").exists():  # once: what the Hub download would give
        from PIL import Image as PILImage

        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(Path(data_dir) / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(Path(data_dir) / f"{prefix}-labels-idx1-ubyte.gz")
        features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
        ds = Dataset.from_dict(
            {"image": [PILImage.fromarray(a) for a in images], "label": labels.tolist()},
            features=features,
        )
        tmp = path.with_name(f"{split}.{os.getpid()}.tmp")
        ds.save_to_disk(str(tmp))
        os.replace(tmp, path)
    return load_from_disk(str(path))


fds = None  # Cache the partitioner (the quickstart caches its FederatedDataset)
pytorch_transforms = Compose([ToTensor()])


def apply_transforms(batch):
    """Apply transforms to the partition from FederatedDataset."""
    batch["image"] = [pytorch_transforms(img) for img in batch["image"]]
    return batch


def load_data(partition_id: int, num_partitions: int, batch_size: int, data_dir: str):
    """Load partition Fashion-MNIST data."""
    # Only initialize the partitioner once
    global fds
    if fds is None:
        from flwr_datasets.partitioner import IidPartitioner

        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = fashion_mnist("train", data_dir)
        fds = partitioner
    partition = fds.load_partition(partition_id).with_transform(apply_transforms)
    return DataLoader(partition, batch_size=batch_size, shuffle=True)


def load_centralized_dataset(data_dir: str):
    """Load the test split for the server-side evaluation."""
    test = fashion_mnist("test", data_dir).with_transform(apply_transforms)
    return DataLoader(test, batch_size=128)


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running_loss, steps = 0.0, 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in trainloader:
            images = batch["image"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            steps += 1
    return running_loss / max(steps, 1), steps, time.perf_counter() - t0


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for batch in testloader:
            images = batch["image"].to(device)
            labels = batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / len(testloader.dataset)
    loss = loss / len(testloader)
    return loss, accuracy
