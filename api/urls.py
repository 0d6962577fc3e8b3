"""The absolute URLs the API hands to clients for a ``/v2`` request: status, result, outputs.

``/v2/{slug}`` answers with the first two, ``/v1`` (several images) and ``GET /v2/requests/{id}``
with the output URLs; both route modules build them here so the layout is written once.
``base`` is ``AppState.public_base(request)``: the configured public URL or the one the client used.
"""

from __future__ import annotations

from diffserve.api.jobs import Job


def status_url(base: str, job_id: str) -> str:
    return f"{base}/v2/requests/{job_id}/status"


def result_url(base: str, job_id: str) -> str:
    return f"{base}/v2/requests/{job_id}"


def output_urls(base: str, job: Job) -> list[str]:
    """One URL per output image of a COMPLETED job, in order (``.../outputs/0.jpg``, ...)."""
    return [f"{base}/v2/requests/{job.id}/outputs/{rel.rsplit('/', 1)[-1]}" for rel in job.outputs]
