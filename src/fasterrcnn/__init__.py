"""Faster R-CNN (Ren et al. 2015) as a Lightning + Hydra experiment workbench."""

__version__ = "0.1.0"
