"""data.augment: torchvision transforms.v2 augmentations by name, checked (spec) and vectorised (ops)."""
