"""Submitting a job for a request and waiting for it, with the gateway's error mapping."""

from __future__ import annotations

import time

from fastapi import Request

from producer import Job, JobResult, QueueFull, WaitTimeout
from producer.errors import InvalidRequest, PayloadTooLarge
from producer.schema import JobRequest
from slotfill.gateway.errors import APIError, bad_request, param_of, queue_full
from slotfill.gateway.state import Gateway, Tenant

WAIT_SLICE_S = 1.0
"""A waiting request looks at its client's connection this often."""


async def submit(gw: Gateway, who: Tenant, req: JobRequest) -> Job:
    try:
        return await gw.client.submit(request=req, queue=who.queue)
    except QueueFull as e:
        raise queue_full(str(e), gw.settings.retry_after_seconds) from None
    except PayloadTooLarge as e:
        raise APIError(413, str(e), code="payload_too_large") from None
    except InvalidRequest as e:
        raise bad_request(str(e), param=param_of(str(e))) from None


async def wait(gw: Gateway, who: Tenant, job: Job, request: Request) -> JobResult:
    """The job's result; cancels the job when the client goes away or the request times out
    (nobody would read the result)."""
    end = time.monotonic() + gw.settings.request_timeout
    done = False
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise APIError(504, f"no result within {gw.settings.request_timeout}s; the "
                               "job was cancelled", kind="server_error", code="timeout")
            try:
                res = await gw.client.wait(job.id, timeout=min(WAIT_SLICE_S, left),
                                           queue=who.queue)
                done = True
                return res
            except WaitTimeout:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected", code="client_closed") from None
    finally:
        if not done:
            gw.abandon(job.id, who.queue)
