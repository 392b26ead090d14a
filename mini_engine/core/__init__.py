"""The continuous-batching core: requests, the KV block manager, the scheduler and its plan.

Nothing here imports torch or onnxruntime: the scheduler and block manager are plain
Python over token ids and block numbers, unit-tested in milliseconds, and the plan they
produce is the whole of what a runner needs to know about a step.
"""
from .block_manager import BlockManager
from .plan import PagedStep, ScheduledSeq, SchedulerOutput
from .request import Request, RequestStatus
from .scheduler import Scheduler
from .scheduler_config import SchedulerConfig

__all__ = ["BlockManager", "PagedStep", "Request", "RequestStatus", "ScheduledSeq", "Scheduler",
           "SchedulerConfig", "SchedulerOutput"]
