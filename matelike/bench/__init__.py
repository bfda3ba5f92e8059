"""`matelike bench ...`: throughput figures, each command printing one JSON line."""
