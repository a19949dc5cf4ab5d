"""fold-bn: BatchNorm and any per-channel affine layer folded into the conv / transposed conv / linear before it."""
