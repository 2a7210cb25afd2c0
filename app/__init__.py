"""prefero service: preference-data collection for RLHF."""

__version__ = "0.1.0"
