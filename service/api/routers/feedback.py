"""Ground truth for past matches, the labels live FAR/FRR and OPIS are computed from."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.auth_first import AuthFirstRoute
from service.api.dependencies import RuntimeDep, TenantId
from service.api.schemas import FeedbackRequest, FeedbackResponse, errors

router = APIRouter(tags=["feedback"], route_class=AuthFirstRoute)


@router.post(
    "/v1/feedback",
    status_code=201,
    operation_id="sendFeedback",
    responses=errors(400, 401, 404, 409, 413, 422, 429, 503),
)
async def feedback(
    body: FeedbackRequest, tenant: TenantId, runtime: RuntimeDep
) -> FeedbackResponse:
    fb = await runtime.serving.matcher.feedback(
        tenant,
        body.match_id,
        true_subject=body.true_subject,
        subject_given="true_subject" in body.model_fields_set,
        correct=body.correct,
    )
    return FeedbackResponse(match_id=fb.match_id, outcome=fb.outcome, genuine=fb.genuine)
