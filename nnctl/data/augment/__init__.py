"""data.augment: torchvision transforms.v2 augmentations by name, checked (spec), vectorised (ops: the draws, crops, flips, resizes, affine, erasing; colour: jitter,
grayscale) and run as one pipeline (pipeline: build -> Augment)."""
