"""fold-fusion: constant computations (fusion-weight normalisation) evaluated; constant scales folded into the convs."""
