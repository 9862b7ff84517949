"""The edges to the outside: Kafka, the wire format, ``.npy`` bytes and the Redis adapter."""
