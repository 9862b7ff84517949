"""The worker and the parts it composes: batching, the result memo, delivery, commits."""
