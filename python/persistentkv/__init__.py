"""persistentkv: Python client of the PersistentKV decode-attention worker.

    from persistentkv import Client
    client = Client("127.0.0.1:50051", router_id="router-a")
    client.write_prompt(seq, k, v)             # [layers, T, Hkv, d] prompt K,V after RoPE
    batch = client.micro_batch()
    batch.add(seq)
    step = batch.token_step()
    for layer in range(client.shape.num_layers):
        out = step.step(layer, q, k_new, v_new)  # [B, Hq, d] attention output of the layer
"""

from persistentkv.client import (Client, MicroBatch, PendingLayer, PromptWriter, RetryPolicy,
                                 StepStream, TokenStep)
from persistentkv.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                 PermissionDenied, ResourceExhausted, Unavailable, WorkerDraining,
                                 WorkerError, WorkerRestarted)
from persistentkv.types import (Limits, ModelShape, OpenTokenStep, PoolInfo, PromptResult,
                                ReleaseResult, StepResult, WorkerInfo)

__version__ = "0.1.0"

__all__ = [
    "Client", "MicroBatch", "PendingLayer", "PromptWriter", "RetryPolicy", "StepStream", "TokenStep",
    "AlreadyExists", "FailedPrecondition", "InvalidArgument", "NotFound", "PermissionDenied",
    "ResourceExhausted", "Unavailable", "WorkerDraining", "WorkerError", "WorkerRestarted",
    "Limits", "ModelShape", "OpenTokenStep", "PoolInfo", "PromptResult", "ReleaseResult",
    "StepResult", "WorkerInfo",
]
