"""Fine-tune an ImageNet EfficientNet-B4 on Caltech-101 (the last 6 of its 9 feature blocks +
a new head) at the weights' own 380 px.

    python main_Efficient_B4.py               # the original table's row
    python main_Efficient_B4.py --compare     # pretrained vs random init (every layer trained)

The original's figure and ours: docs/RESULTS.md#b4.
"""
import common

DEFAULTS = dict(
    arch="efficientnet_b4",
    batch_size=64,
    epochs=30,
    scratch_epochs=50,
    scratch_recipe="original",  # --weights none: the tuned one is ResNet-18's
    lr=3e-4,  # head; backbone lr = lr * 0.1
    weight_decay=1e-4,
    unfreeze="last:6",  # features[3:9], the original's features[-6:]
    description=__doc__,
)

# The original's grid (batch, lr, weight decay, last 6 or 4 blocks), with "all" added.
GRID = dict(
    batch_size=[32, 64],
    epochs=[30],
    lr=[3e-4, 1e-3],
    weight_decay=[1e-4, 1e-3],
    unfreeze=["last:6", "last:4", "all"],
)

if __name__ == "__main__":
    common.main(DEFAULTS, GRID)
