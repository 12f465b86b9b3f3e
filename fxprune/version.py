"""The fxprune version (core: read by reports and archives without importing the package facade)."""
__version__ = "0.1.0"
