"""Model parameters: typed cache keys, the versioned store, the registry, announcements,
model kinds and training."""
