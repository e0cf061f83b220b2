"""Fundus-Engine: retinal fundus photographs in, FundusGen-style instruction data out."""

__version__ = "0.1.0"
