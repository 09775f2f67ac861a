"""S2DS, the data plane: proxy backends, their configuration and their supervision."""
