"""The async in-process cache: byte budget, TTL, single-flight loads, eviction policies.

Generic: no Redis, no Kafka, no models.
"""
