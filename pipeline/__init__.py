"""kvpipe: streaming inference on Kafka with parameters in Redis behind an async cache."""
