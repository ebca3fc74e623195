"""megavod: MEGA (Memory Enhanced Global-Local Aggregation, CVPR 2020) video object detection."""

__version__ = "0.1.0"
