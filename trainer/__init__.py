"""prefero trainer: reward models and PPO from prefero exports. Never imports ``app``."""

__version__ = "0.1.0"
