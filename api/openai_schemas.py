"""Wire shapes of the OpenAI images dialect (``diffserve.api.routes.openai_images``): the response and the
error body the ``openai`` SDK reads. Kept apart from ``diffserve.api.schemas`` (the Segmind contract) so
neither dialect's shapes leak into the other's routes.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class OpenAIImage(BaseModel):
    b64_json: str | None = Field(None, description="The image, base64 (response_format=b64_json).")
    url: str | None = Field(None, description="Absolute URL of the image, served by this API without a key "
                                              "for the retention period (response_format=url).")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time (seconds) the images were made.")
    data: list[OpenAIImage]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, ... or server_error")
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail
