"""Fine-tune an ImageNet ResNet-50 on Caltech-101 (layer4 + a new head).

    python main_ResNet-50.py                  # the original table's row
    python main_ResNet-50.py --grid --compare # grid on validation, then winner vs random init

The original's figure and ours: docs/RESULTS.md#resnet50.
"""
import common

DEFAULTS = dict(
    arch="resnet50",
    batch_size=32,
    epochs=30,
    scratch_epochs=50,
    scratch_recipe="tuned",  # --weights none: ResNet-18's, not measured here
    lr=1e-3,  # head; backbone lr = lr * 0.1
    weight_decay=1e-5,
    unfreeze="last:1",  # layer4
    description=__doc__,
)

# Ranked on validation; "all" (the whole network, backbone at lr/10) is a candidate, not yet
# measured (docs/RESULTS.md#resnet50).
GRID = dict(
    batch_size=[32, 64],
    epochs=[30],
    lr=[1e-3, 3e-4],
    weight_decay=[1e-5, 1e-4],
    unfreeze=["last:1", "last:2", "all"],
)

if __name__ == "__main__":
    common.main(DEFAULTS, GRID)
