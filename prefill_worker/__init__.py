"""The prefill worker: prompts in, first token out, KV pushed to a decode worker."""
