"""The decode worker: receives KV, decodes with continuous batching, streams tokens (and, colocated, prefills too)."""
