"""Fine-tune an ImageNet ResNet-18 on Caltech-101 (layer4 + a new head), or train it from
random weights with --weights none: the study's baseline.

    python main_ResNet-18.py                  # pretrained: the original table's row
    python main_ResNet-18.py --weights none   # random init, every layer, 50 epochs, the tuned scratch recipe
    python main_ResNet-18.py --weights none --scratch-recipe original   # the original's scratch row
    python main_ResNet-18.py --grid           # the grid below, ranked on validation

The original's figures and ours: docs/RESULTS.md#resnet18.
"""
import common

DEFAULTS = dict(
    arch="resnet18",
    batch_size=64,
    epochs=30,  # pretrained
    scratch_epochs=50,  # --weights none
    scratch_recipe="tuned",  # --weights none: docs/RESULTS.md#scratch
    lr=3e-4,  # head; backbone lr = lr * 0.1
    weight_decay=1e-5,
    unfreeze="last:1",  # layer4
    description=__doc__,
)

# The original's grid (2 x 2 x 2 x 2 x 2 for pretrained), with whole-network fine-tuning added.
GRID = dict(
    batch_size=[32, 64],
    epochs=[30, 50],
    lr=[3e-4, 5e-5],
    weight_decay=[1e-4, 1e-3],
    unfreeze=["last:1", "last:2", "all"],
)

if __name__ == "__main__":
    common.main(DEFAULTS, GRID)
