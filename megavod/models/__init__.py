"""Detectors and their parts. Each detector follows the contract of :mod:`megavod.models.contract`; which
detector a config builds is the method table's business (:mod:`megavod.registry`, :mod:`megavod.methods`)."""
