"""Fine-tune an ImageNet ResNet-101 on Caltech-101 (layer3, layer4 + a new head).

The original table's strategy "layer3" is read as layer3 onward: --unfreeze last:2.

    python main_ResNet-101.py                 # the original table's row

The original's figure and ours: docs/RESULTS.md#resnet101.
"""
import common

DEFAULTS = dict(
    arch="resnet101",
    batch_size=32,
    epochs=50,
    scratch_epochs=50,
    scratch_recipe="tuned",  # --weights none: ResNet-18's, not measured here
    lr=5e-4,  # head; backbone lr = lr * 0.1
    weight_decay=1e-5,
    unfreeze="last:2",  # layer3, layer4
    description=__doc__,
)

GRID = dict(
    batch_size=[32],
    epochs=[30, 50],
    lr=[5e-4, 1e-4],
    weight_decay=[1e-5, 1e-4],
    unfreeze=["last:2", "all"],
)

if __name__ == "__main__":
    common.main(DEFAULTS, GRID)
