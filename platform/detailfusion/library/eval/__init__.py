"""Metrics and protocols (CIRR, FashionIQ), submission files, per-query outcomes, statistics, claims: no Ray."""
