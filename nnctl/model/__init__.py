"""The model: layer registry, blocks, the plan (shapes on meta), torchvision source, freeze, weights in, summary, graph."""
