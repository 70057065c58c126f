"""mailplat: a pluggable mail platform for people who host a few domains themselves."""

__version__ = "0.1.0"
