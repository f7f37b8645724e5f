"""Canonical schemas, the dataset readers (CIRR, FashionIQ, IPr2Pr) and the synthetic datasets: no Ray."""
