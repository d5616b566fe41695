"""Moving KV blocks from a prefill worker to a decode worker. Makes no scheduling decisions.

`connector.KVConnector` is the interface; backends: `in_process` (tests, one process) and `torch_dist`
(torch.distributed pairs: gloo for CPU tensors, NCCL for CUDA tensors).
"""
