"""focus-to-conv: a space-to-depth stem (YOLOv5 Focus, pixel_unshuffle, SpaceToDepth) + conv becomes one strided conv."""
