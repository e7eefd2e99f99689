"""Ready-made Balancer configurations."""

from mtlbal.presets.fuller import fuller, fuller_modality_level, fuller_task_level

__all__ = ["fuller", "fuller_modality_level", "fuller_task_level"]
