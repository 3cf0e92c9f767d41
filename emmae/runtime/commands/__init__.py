"""The commands (``emmae-pick``, ``emmae-stream``, ``emmae-eval``): arguments, logging and exit codes only."""
