"""The relay: every final event of every SKU's events streams to the order system."""
