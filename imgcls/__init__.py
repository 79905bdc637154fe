"""imgcls: train image classifiers from scratch on small datasets and write correct submissions."""

__version__ = "0.1.0"
