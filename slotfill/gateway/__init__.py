"""``slotfill gateway``: an OpenAI-compatible HTTP front door onto the queue.

Stateless: every instance reads and writes only Redis (jobs through the public producer
client, files, batches and background responses under the keys of :mod:`slotfill.gateway.keys`),
so any number of instances can run behind a load balancer. Needs ``pip install
'slotfill[gateway]'`` (FastAPI, uvicorn, prometheus-client, python-multipart).
"""
