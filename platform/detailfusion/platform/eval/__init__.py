"""Distributed gallery encoding, the ``evaluate`` job, validation during training and index building."""
