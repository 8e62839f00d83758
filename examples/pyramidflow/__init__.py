"""PyramidFlow (CVPR 2023): normalizing-flow defect localization without pre-trained models."""
