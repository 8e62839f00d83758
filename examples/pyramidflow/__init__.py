"""PyramidFlow (CVPR 2023): fully normalizing-flow defect localization without pre-trained models."""
