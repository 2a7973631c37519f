"""The original study's training input path, the benches' baseline: its scripts' torchvision
train transforms and their ImageFolder + DataLoader(shuffle) loop.

augment.SEED_POLICIES reproduces these transforms as plain data (--augment seed); this module keeps
them as the original scripts wrote them, for bench_data.py and bench_train.py to run.
"""
import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # ImageNet, the original's Normalize
NATIVE_CROP = {"resnet18": 224, "resnet50": 224, "resnet101": 224, "efficientnet_b4": 380}   # px
STAND_IN = {"efficientnet_lite0": "resnet18"}   # no original script: the ResNet-18 one's, as augment


def resize_of(seed_policy: str, crop: int) -> int:
    """The original's Resize before the random crop, px: 256 for a 224 crop (ResNets, scaled
    with the crop), the crop itself for EfficientNet-B4."""
    return crop if STAND_IN.get(seed_policy, seed_policy) == "efficientnet_b4" else round(crop * 256 / 224)


def train_transform(seed_policy: str, crop: int | None = None):
    """The original script's train transforms for `seed_policy` (augment.SEED_POLICIES's names), at
    its own crop (NATIVE_CROP) or scaled to `crop` px."""
    from torchvision import transforms as T
    name = STAND_IN.get(seed_policy, seed_policy)
    if name not in NATIVE_CROP:
        raise ValueError(f"no original transforms for {seed_policy!r}; choose from "
                         f"{', '.join(list(NATIVE_CROP) + list(STAND_IN))}")
    crop = crop or NATIVE_CROP[name]
    steps = {
        "resnet18": [T.RandomResizedCrop(crop, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                     T.RandomRotation(15),
                     T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
                     T.RandomGrayscale(p=0.1)],
        "resnet50": [T.RandomResizedCrop(crop, scale=(0.8, 1.0)), T.RandomHorizontalFlip(),
                     T.RandomRotation(10), T.ColorJitter(0.05, 0.05, 0.05)],
        "resnet101": [T.RandomResizedCrop(crop), T.RandomHorizontalFlip(),
                      T.ColorJitter(brightness=0.2, contrast=0.2)],
        "efficientnet_b4": [T.RandomResizedCrop(crop, scale=(0.6, 1.4)), T.RandomHorizontalFlip(),
                            T.RandomRotation(20), T.ColorJitter(0.2, 0.2, 0.2, 0.1),
                            T.GaussianBlur(kernel_size=3, sigma=(0.1, 2.0)),
                            T.RandomPerspective(distortion_scale=0.2, p=0.5)],
    }[name]
    return T.Compose([T.Resize(resize_of(name, crop))] + steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


def batches(train_dir: str, transform, batch_size: int, workers: int, device: torch.device):
    """The original's loader: ImageFolder(train_dir, transform) + DataLoader(shuffle, drop_last)
    -> (images in the folder, an iterator of (x, y) batches on `device`, epoch after epoch)."""
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(train_dir, transform=transform)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0,
        pin_memory=device.type == "cuda")

    def forever():
        while True:
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return len(ds), forever()
